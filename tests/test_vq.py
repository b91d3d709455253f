"""VQ-VAE / VQ-VAE2 models and the shared quantizer (fast, one process; plus a 2-rank quantizer sync test)."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, leave_two_rank_group

from facegen_dist.config import load_config
from facegen_dist.errors import ConfigError
from facegen_dist.models.quantizer import VectorQuantizer
from facegen_dist.models.vqvae import VQVAE, VQVAE2
from facegen_dist.runs import build_method

TINY_QUANT = dict(num_codes=32, dead_code_steps=3)


@pytest.mark.parametrize("model_class, levels", [(VQVAE, ("bottom",)), (VQVAE2, ("top", "bottom"))])
@pytest.mark.parametrize("resolution", [64, 128])
def test_shapes_forward_backward_and_decode_codes(model_class, levels, resolution):
    torch.manual_seed(0)
    model = model_class(channels=16, res_blocks=1, res_channels=8, embed_dim=8, downsample=4, quant=TINY_QUANT)
    images = torch.rand(2, 3, resolution, resolution)
    reconstruction, indices, loss, stats = model(images)
    assert reconstruction.shape == images.shape
    assert tuple(indices) == levels == tuple(stats)
    for level, (height, width) in model.grid_shapes(resolution).items():
        assert indices[level].shape == (2, height, width)
    assert model.grid_shapes(resolution)["bottom"] == (resolution // 4, resolution // 4)
    (torch.nn.functional.mse_loss(reconstruction, images) + loss).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        again, codes, _, _ = model(images)
        assert torch.allclose(model.decode_codes(codes), again, atol=1e-5)


def test_straight_through_gradient_is_identity():
    quantizer = VectorQuantizer(num_codes=8, dim=4, kmeans_init=False)
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, _, _, _ = quantizer(latents)
    upstream = torch.randn_like(quantized)
    (quantized * upstream).sum().backward()
    assert torch.allclose(latents.grad, upstream)


def test_loss_rule_learns_codebook_by_gradient_and_commitment_is_beta_weighted():
    quantizer = VectorQuantizer(num_codes=8, dim=4, beta=0.25, update="loss", kmeans_init=False)
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, indices, loss, stats = quantizer(latents)
    code_vectors = quantizer.lookup(indices)
    distance = torch.nn.functional.mse_loss(latents, code_vectors)
    assert torch.allclose(loss, 1.25 * distance)  # codebook term (1) + commitment (beta)
    loss.backward()
    assert quantizer.codebook.grad is not None and quantizer.codebook.grad.abs().sum() > 0


def test_ema_rule_moves_codes_to_the_mean_of_their_vectors():
    quantizer = VectorQuantizer(num_codes=2, dim=2, update="ema", decay=0.0, kmeans_init=False, eps=1e-12)
    quantizer.codebook.data = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    assert not quantizer.codebook.requires_grad
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0], [11.0, 12.0]])
    quantizer(vectors.t().reshape(1, 2, 2, 2))
    assert torch.allclose(quantizer.codebook.data, torch.tensor([[0.5, 0.5], [10.0, 10.5]]), atol=1e-4)


def test_distances_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=64, dim=8, kmeans_init=False).eval()
    latents = torch.randn(4, 8, 6, 6) * 0.01 + quantizer.codebook.data[:1].reshape(1, 8, 1, 1)  # close calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices, _, _ = quantizer(latents)
    _, expected, _, _ = quantizer(latents)
    assert quantized.dtype == torch.float32 and torch.equal(indices, expected)


def test_kmeans_init_finds_the_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    vectors = centres.repeat_interleave(64, 0) + 0.05 * torch.randn(256, 2)
    quantizer = VectorQuantizer(num_codes=4, dim=2, kmeans_init=True)
    quantizer(vectors.t().reshape(1, 2, 16, 16))
    found = torch.cdist(centres, quantizer.codebook.data).min(1).values
    assert bool(quantizer.initialized) and found.max() < 0.2, found


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=8, dim=2, kmeans_init=False, dead_code_steps=2)
    codes = torch.cat([torch.zeros(1, 2), torch.full((7, 2), 100.0)])  # only code 0 is ever picked
    quantizer.codebook.data.copy_(codes)
    quantizer.embed_sum.copy_(codes)  # consistent EMA state: the far codes stay far until restarted
    vectors = torch.randn(1, 2, 4, 4)
    for _ in range(2):
        _, _, _, stats = quantizer(vectors)
    assert stats["restarts"] == 7
    flat = vectors.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in quantizer.codebook.data[1:]:
        assert torch.isclose(flat, code).all(1).any(), "a restarted code is not one of the current encoder outputs"


def test_ema_codebook_without_kmeans_stays_put_and_non_finite_batches_teach_it_nothing():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(num_codes=16, dim=4, update="ema", decay=0.99, kmeans_init=False)
    initial = quantizer.codebook.data.clone()
    quantizer(torch.randn(2, 4, 4, 4))
    assert (quantizer.codebook.data - initial).abs().max() < 0.1  # one step moves codes by ~1 %, no blow-up
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    poisoned = torch.randn(2, 4, 4, 4)
    poisoned[0, 0, 0, 0] = float("inf")
    quantizer(poisoned)
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} learnt from a non-finite batch"
    _, _, loss, _ = quantizer(torch.randn(2, 4, 4, 4))
    assert torch.isfinite(loss)


def test_cosine_codes_are_unit_length():
    quantizer = VectorQuantizer(num_codes=16, dim=4, cosine=True)
    quantized, _, _, _ = quantizer(torch.randn(2, 4, 4, 4) * 3)
    assert torch.allclose(quantized.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    assert torch.allclose(quantizer.codebook.data.norm(dim=1), torch.ones(16), atol=1e-5)


def _quantizer_rank(rank: int, port: int, update: str, queue, rank1_done) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial codebook
    quantizer = VectorQuantizer(num_codes=16, dim=4, update=update, kmeans_init=True, dead_code_steps=2)
    optimizer = torch.optim.SGD(
        [p for p in quantizer.parameters() if p.requires_grad] or [torch.zeros(1, requires_grad=True)], lr=0.1
    )
    torch.manual_seed(100 + rank)  # different data on each rank
    for _ in range(6):
        latents = (torch.randn(3, 4, 4, 4) * (1 + rank)).requires_grad_()  # an encoder's output
        _, _, loss, _ = quantizer(latents)
        loss.backward()
        for param in quantizer.parameters():  # what DDP does for the loss rule
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= 2
        optimizer.step()
        optimizer.zero_grad()
    queue.put((rank, {k: v.numpy().copy() for k, v in quantizer.state_dict().items()}))  # numpy: pickled by value
    leave_two_rank_group(rank, rank1_done, queue)


@pytest.mark.parametrize("update", ["ema", "loss"])
def test_two_ranks_with_different_data_hold_identical_codebooks(update):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    rank1_done = context.Event()
    processes = [
        context.Process(target=_quantizer_rank, args=(rank, port, update, queue, rank1_done)) for rank in range(2)
    ]
    for process in processes:
        process.start()
    states = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert set(states) == {0, 1}
    assert int(states[0]["restarts"]) > 0  # dead-code restarts happened, and identically
    for key, value in states[0].items():
        assert (value == states[1][key]).all(), f"{key} differs between ranks"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.codebook_update=sgd", "model.codebook_update: 'sgd'"),
        ("model.downsample=3", "model.downsample: 3"),
        ("model.top_encoder_channels=-1", "model.top_encoder_channels: -1"),
    ],
)
def test_bad_vq_settings_are_one_line_config_errors(override, expected, tiny_shards):
    cfg = load_config([], ["model.name=vqvae2", override, f"data.path={tiny_shards}"])
    with pytest.raises(ConfigError) as error:
        build_method(cfg.model, 64).build_modules()
    assert expected in str(error.value) and "\n" not in str(error.value)


def _vqvae2_256(*overrides: str) -> torch.nn.Module:
    config = Path(__file__).resolve().parents[1] / "configs" / "vqvae2_avatars256.yaml"
    cfg = load_config([str(config)], list(overrides))
    return build_method(cfg.model, 256).build_modules()["vqvae"]


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def test_top_encoder_channels_gives_rosinality_parameter_count_and_the_default_keeps_old_runs_loading():
    def trainable(model):  # the EMA codebooks are parameters without gradient here, buffers in rosinality's code
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    default, rosinality = _vqvae2_256(), _vqvae2_256("model.top_encoder_channels=64")
    # rosinality/vq-vae-2-pytorch VQVAE() at its defaults: 1 388 867 parameters (counted on the vendored code).
    assert trainable(rosinality) == 1_388_867
    # The default is the layout written before the key existed: 1 593 731 trainable, a 128 -> 128 top encoder.
    assert trainable(default) == 1_593_731
    shapes = dict(_layout(default))
    assert shapes["encoder_top.net.0.weight"] == (128, 128, 4, 4) and shapes["encoder_top.net.2.weight"] == (
        128,
        128,
        3,
        3,
    )
    assert dict(_layout(rosinality))["encoder_top.net.2.weight"] == (128, 64, 3, 3)
    # Same keys in the same order, so an old run's state dict loads strictly and the model runs.
    assert [name for name, _ in _layout(default)] == [name for name, _ in _layout(rosinality)]
    torch.manual_seed(0)
    old_run = VQVAE2(quant=dict(num_codes=512)).state_dict()
    default.load_state_dict(old_run, strict=True)
    default.eval()
    with torch.no_grad():
        assert default(torch.rand(1, 3, 64, 64))[0].shape == (1, 3, 64, 64)
