"""train.activation_checkpointing: the same loss and gradients as without, less retained activation memory."""

from pathlib import Path

import pytest
import torch

from facegen_dist.config import load_config
from facegen_dist.errors import ConfigError
from facegen_dist.methods import MicroBatch
from facegen_dist.methods.prior import GPTPriorMethod, PixelCNNPriorMethod
from facegen_dist.models.gpt import CodeGPT
from facegen_dist.models.pixelcnn import GatedPixelCNN
from facegen_dist.runs import build_method
from facegen_dist.train.activation_checkpointing import checkpoint_blocks, retained_activation_bytes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.replace(WRAPPER_PREFIX, ""): p.grad.clone() for name, p in module.named_parameters() if p.grad is not None
    }


def _compare(build, loss_of, block_types, name="m"):
    """Same seed, same weights: build twice, checkpoint one copy, compare loss, gradients and retained bytes."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        modules = build()
        if checkpointed:
            assert checkpoint_blocks(modules, block_types, name) > 0
        torch.manual_seed(1)
        loss, retained = retained_activation_bytes(lambda: loss_of(modules))
        loss.backward()
        grads = {
            key: g
            for module_name, module in modules.items()
            for key, g in _grads(module).items()
            if module_name == next(iter(modules))
        }
        results.append((loss.detach(), grads, retained, modules))
    (loss_a, grads_a, bytes_a, plain), (loss_b, grads_b, bytes_b, wrapped) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-5, atol=1e-7, msg=key)
    assert bytes_b < bytes_a, (bytes_a, bytes_b)
    # The wrapper's prefix never reaches a state_dict: checkpoints load with or without it.
    first = next(iter(plain))
    assert plain[first].state_dict().keys() == wrapped[first].state_dict().keys()
    return bytes_a, bytes_b


def _method(config: str, *overrides: str):
    cfg = load_config([str(CONFIGS / config)], list(overrides))
    return build_method(cfg.model, cfg.data.resolution)


def test_vqvae2_gradients_match(one_intra_op_thread):
    method = _method(
        "vqvae2_avatars64.yaml",
        "data.resolution=32",
        "model.channels=16",
        "model.res_blocks=2",
        "model.res_channels=8",
        "model.embed_dim=8",
        "model.num_codes=32",
        "model.downsample=4",
    )
    images = torch.rand(4, 3, 32, 32)
    batch = MicroBatch(0, images=images)
    _compare(method.build_modules, lambda modules: method.loss("vqvae", modules, batch)[0], method.checkpoint_blocks())


def test_vqgan_gradients_match(one_intra_op_thread):
    method = _method(
        "vqgan_avatars64.yaml",
        "data.resolution=32",
        "model.channels=16",
        "model.channel_mult=[1,2,2]",
        "model.res_blocks=1",
        "model.attn_resolutions=[8]",
        "model.z_channels=16",
        "model.embed_dim=16",
        "model.num_codes=64",
        "model.perceptual=tiny",
    )
    method.prepare_training()
    phase = next(p.name for p in method.phases() if "vqvae" in p.modules)  # the generator (autoencoder) phase
    batch = method.prepare(MicroBatch(0, images=torch.rand(2, 3, 32, 32)))
    _compare(method.build_modules, lambda modules: method.loss(phase, modules, batch)[0], method.checkpoint_blocks())


def test_gpt_prior_gradients_match(one_intra_op_thread):
    codes = torch.randint(0, 32, (4, 64))
    _compare(
        lambda: {"prior": CodeGPT(32, 64, 3, 2, 32)},
        lambda modules: modules["prior"].loss(codes),
        GPTPriorMethod.checkpoint_blocks(None),
    )


def test_pixelcnn_prior_gradients_match(one_intra_op_thread):
    codes = torch.randint(0, 32, (4, 8, 8))
    _compare(
        lambda: {"prior": GatedPixelCNN(32, channels=16, num_layers=4, kernel_size=3)},
        lambda modules: modules["prior"].loss(codes),
        PixelCNNPriorMethod.checkpoint_blocks(None),
    )


def test_batchnorm_models_refuse_with_one_line():
    method = _method("vae_avatars64.yaml")
    with pytest.raises(ConfigError, match="model.name=vae has no blocks to checkpoint") as error:
        checkpoint_blocks(method.build_modules(), method.checkpoint_blocks(), "vae")
    assert "\n" not in str(error.value)
