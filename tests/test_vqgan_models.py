"""VQ-GAN model pieces: autoencoder, patch discriminator, GAN losses, perceptual loss (fast, CPU, 32 px)."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import TINY_VQGAN, free_port, leave_two_rank_group

from facegen_dist.errors import ConfigError
from facegen_dist.methods import MicroBatch
from facegen_dist.models.discriminator import ActNorm, PatchDiscriminator
from facegen_dist.models.gan_losses import (
    adaptive_generator_weight,
    disc_factor,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from facegen_dist.models.vqgan import VQGAN, AttnBlock, ResnetBlock, group_count
from facegen_dist.models.vqvae import VQVAE
from facegen_dist.train.activation_checkpointing import checkpoint_blocks
from facegen_dist.weights import ALLOW_DOWNLOAD_ENV, VGG16_FILE, perceptual_loss, vgg16_weights_path

TINY_QUANT = dict(num_codes=32, dead_code_steps=3)
CH_MULT = {4: (1, 2, 2), 8: (1, 1, 2, 2)}  # downsampling factor -> channel multipliers


def tiny_vqgan(factor: int = 4, **overrides) -> VQGAN:
    settings = dict(
        ch=16,
        ch_mult=CH_MULT[factor],
        num_res_blocks=1,
        attn_resolutions=(32 // factor,),
        resolution=32,
        embed_dim=8,
        z_channels=16,
        quant=TINY_QUANT,
    )
    return VQGAN(**{**settings, **overrides})


def _structure(outputs):
    """Types and dict keys of (recon, indices, loss, stats): what downstream code relies on."""
    recon, indices, loss, stats = outputs
    return type(recon), tuple(indices), loss.shape, tuple(stats), {level: tuple(s) for level, s in stats.items()}


@pytest.mark.parametrize("factor", [4, 8])
def test_vqgan_has_the_vqvae_interface(factor):
    torch.manual_seed(0)
    model = tiny_vqgan(factor)
    images = torch.rand(2, 3, 32, 32)
    side = 32 // factor
    assert model.levels == VQVAE.levels == ("bottom",)
    assert model.grid_shapes(32) == {"bottom": (side, side)} and model.grid_shapes(64) == {
        "bottom": (2 * side, 2 * side)
    }
    assert model.quantizers() == {"bottom": model.quantize}
    assert model.encode_latents(images)["bottom"].shape == (2, 8, side, side)

    outputs = model(images)
    reference = VQVAE(channels=16, res_blocks=1, res_channels=8, embed_dim=8, downsample=factor, quant=TINY_QUANT)(
        images
    )
    assert _structure(outputs) == _structure(reference)
    reconstruction, indices, loss, stats = outputs
    assert reconstruction.shape == images.shape and indices["bottom"].shape == (2, side, side)
    (F.l1_loss(reconstruction, images) + loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model.eval()
    with torch.no_grad():
        quantized, codes, _, _ = model.encode(images)
        again = model.decode(quantized)
        assert torch.allclose(model.decode_codes(codes), again, atol=1e-5)
        assert torch.allclose(model(images)[0], again)


def test_tiny_widths_build_with_fewer_norm_groups():
    assert [group_count(c) for c in (3, 8, 16, 48, 64, 128, 512)] == [3, 8, 16, 24, 32, 32, 32]
    model = tiny_vqgan(4, ch=8)
    assert model(torch.rand(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)
    assert model.encoder.down[0].block[0].norm1.num_groups == 8


def test_attention_sits_at_the_listed_resolution_and_in_the_middle():
    model = tiny_vqgan(4, num_res_blocks=2, attn_resolutions=(16,))
    seen = {"encoder": [], "decoder": []}
    for part in seen:
        for module in getattr(model, part).modules():
            if isinstance(module, AttnBlock):
                module.register_forward_hook(
                    lambda m, args, out, part=part: seen[part].append(tuple(args[0].shape[2:]))
                )
    model(torch.rand(1, 3, 32, 32))
    # Encoder: 2 blocks at 16 px, then the middle at 8 px; decoder: the middle, then 2+1 blocks at 16 px.
    assert seen["encoder"] == [(16, 16)] * 2 + [(8, 8)]
    assert seen["decoder"] == [(8, 8)] + [(16, 16)] * 3


def test_last_layer_is_the_decoders_output_conv():
    model = tiny_vqgan(4)
    assert model.last_layer() is model.decoder.conv_out.weight and model.last_layer().shape[0] == 3


def _gan_graph(seed: int = 0):
    torch.manual_seed(seed)
    model, critic = tiny_vqgan(4), PatchDiscriminator(ndf=8, n_layers=2)
    images = torch.rand(2, 3, 32, 32)
    reconstruction, _, quant_loss, _ = model(images)
    nll = F.l1_loss(reconstruction, images) + perceptual_loss("tiny")(reconstruction, images).mean()
    g_loss = generator_adversarial_loss(critic(reconstruction), "hinge")
    return model, nll, g_loss, quant_loss


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    model, nll, g_loss, quant_loss = _gan_graph()
    weight, reason = adaptive_generator_weight(nll, g_loss, model.last_layer())
    assert reason is None and not weight.requires_grad and math.isfinite(weight.item())

    last = model.last_layer()
    nll.backward(retain_graph=True)  # the graph was retained: the caller's backward still works
    nll_grad, last.grad = last.grad.clone(), None
    g_loss.backward(retain_graph=True)
    expected = nll_grad.norm() / (last.grad.norm() + 1e-4)
    assert torch.allclose(weight, expected, rtol=1e-5)


def test_adaptive_weight_is_clamped_and_always_finite():
    model, nll, g_loss, quant_loss = _gan_graph()
    last = model.last_layer()
    weight, reason = adaptive_generator_weight(nll, g_loss * 1e-9, last, max_weight=10.0)
    assert weight.item() == 10.0 and reason is None  # the ratio would be far above 10

    for bad_nll, bad_g, why in [
        (nll * float("nan"), g_loss, "non-finite"),
        (nll * float("inf"), g_loss, "non-finite"),
        (nll, g_loss * 0.0, "zero"),  # generator gradient exactly zero
        (nll, quant_loss, "zero"),  # g does not reach the last layer at all
    ]:
        weight, reason = adaptive_generator_weight(bad_nll, bad_g, last)
        assert weight.item() == 0.0 and why in reason, reason

    with torch.no_grad():
        _, no_graph_nll, no_graph_g, _ = _gan_graph()
    weight, reason = adaptive_generator_weight(no_graph_nll, no_graph_g, model.last_layer())
    assert weight.item() == 0.0 and "no graph" in reason


def test_disc_factor_counts_images():
    assert disc_factor(0, 100) == 0.0
    assert disc_factor(99, 100) == 0.0
    assert disc_factor(100, 100) == 1.0
    assert disc_factor(5000, 100, factor=0.5) == 0.5
    assert disc_factor(0, 0) == 1.0


def test_gan_loss_values_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6; half the sum = 1.
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    vanilla = 0.5 * (sum(softplus(-r) for r in [2.0, 0.5, -1.0]) / 3 + sum(softplus(f) for f in [-2.0, 0.0, 1.5]) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla)
    assert discriminator_loss(real, fake, "hinge") == hinge_d_loss(real, fake)
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(0.5 / 3)
    assert generator_adversarial_loss(fake, "vanilla").item() == pytest.approx(
        sum(softplus(-f) for f in [-2.0, 0.0, 1.5]) / 3
    )
    with pytest.raises(ValueError):
        generator_adversarial_loss(fake, "wgan")


@pytest.mark.parametrize("norm", ["batch", "act", "none"])
@pytest.mark.parametrize("n_layers, size", [(3, 32), (2, 64)])
def test_discriminator_returns_a_patch_map_and_features(norm, n_layers, size):
    torch.manual_seed(0)
    critic = PatchDiscriminator(ndf=8, n_layers=n_layers, norm=norm)
    images = torch.rand(2, 3, size, size)
    patches = size // 2**n_layers - 2
    assert critic(images).shape == (2, 1, patches, patches)
    logits, features = critic(images, return_features=True)
    assert logits.shape == (2, 1, patches, patches) and len(features) == n_layers + 1
    assert features[0].shape == (2, 8, size // 2, size // 2)


def test_discriminator_init_and_input_range():
    torch.manual_seed(0)
    critic = PatchDiscriminator(ndf=64, n_layers=3)
    assert abs(critic.main[0].weight.std().item() - 0.02) < 0.003  # taming's weights_init
    assert critic.main[3].bias.abs().max() == 0 and (critic.main[3].weight - 1).abs().max() < 0.1  # BatchNorm
    critic.eval()
    gray = torch.full((1, 3, 32, 32), 0.5)  # 0.5 in [0, 1] is 0 in [-1, 1]: the first conv sees only zeros
    first = critic.main[0]
    assert torch.allclose(
        critic.main[:2](gray * 2 - 1), F.leaky_relu(first.bias.view(1, -1, 1, 1).expand(1, -1, 16, 16), 0.2)
    )


def test_feature_matching_loss():
    real = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    fake = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    assert feature_matching_loss(real, [r.detach().clone() for r in real]).item() == 0.0
    loss = feature_matching_loss(real, fake)
    expected = (F.l1_loss(fake[0], real[0]) + F.l1_loss(fake[1], real[1])) / 2
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(r.grad is None for r in real) and all(f.grad is not None for f in fake)


def test_actnorm_initialises_to_zero_mean_unit_std():
    torch.manual_seed(0)
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) + 7
    out = norm(x)
    flat = out.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-5) and torch.allclose(
        flat.std(1), torch.ones(4), atol=1e-4
    )
    assert int(norm.initialized) == 1
    loc = norm.loc.detach().clone()
    norm(x + 100)  # initialised once only
    assert torch.equal(norm.loc, loc)


def _actnorm_rank(rank: int, port: int, queue, rank1_done) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # different data, and a different batch size, on each rank
    data = torch.randn(3 + rank, 4, 5, 5) * (1 + rank) + rank
    norm = ActNorm(4)
    norm(data)
    queue.put((rank, data.numpy().copy(), norm.loc.detach().numpy().copy(), norm.scale.detach().numpy().copy()))
    leave_two_rank_group(rank, rank1_done, queue)


@pytest.mark.slow
def test_actnorm_init_is_the_same_on_every_rank_and_uses_all_ranks_data():
    context = mp.get_context("spawn")
    queue, rank1_done, port = context.Queue(), context.Event(), free_port()
    processes = [context.Process(target=_actnorm_rank, args=(rank, port, queue, rank1_done)) for rank in range(2)]
    for process in processes:
        process.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=120) for _ in processes)}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    (data0, loc0, scale0), (data1, loc1, scale1) = results[0], results[1]
    assert (loc0 == loc1).all() and (scale0 == scale1).all()
    pooled = torch.cat([torch.from_numpy(data0), torch.from_numpy(data1)]).transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(torch.from_numpy(loc0).flatten().double(), -pooled.mean(1), atol=1e-5)
    assert torch.allclose(torch.from_numpy(scale0).flatten().double(), 1 / (pooled.std(1) + 1e-6), rtol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny", "avatar"])
def test_perceptual_loss_is_a_frozen_deterministic_distance(backbone):
    torch.manual_seed(1)
    first = perceptual_loss(backbone)
    torch.manual_seed(2)  # the global RNG must not matter
    second = perceptual_loss(backbone)
    assert [p for p in first.parameters() if p.requires_grad] == []
    images, others = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    assert torch.equal(first(images, images), torch.zeros(3))
    distance = first(images, others)
    assert distance.shape == (3,) and (distance > 0).all()
    assert torch.equal(distance, second(images, others))
    first.train()
    assert not first.training and not any(m.training for m in first.modules())
    moving = images.clone().requires_grad_()
    first(moving, others).sum().backward()
    assert moving.grad is not None and moving.grad.abs().sum() > 0 and torch.isfinite(moving.grad).all()


def test_avatar_perceptual_loss_uses_the_shipped_network_and_ranks_blur_above_identity():
    from facegen_dist.eval.avatar_extractor import load_attribute_net

    loss = perceptual_loss("avatar")
    net, _ = load_attribute_net()
    assert all(
        torch.equal(a, b) for a, b in zip(loss.net.stages.state_dict().values(), net.trunk.state_dict().values())
    )
    images = torch.rand(2, 3, 64, 64)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    assert (loss(blurred, images) > loss(images, images)).all()


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub dir, downloads refused (FACEGEN_ALLOW_DOWNLOAD=0), and any download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setenv(ALLOW_DOWNLOAD_ENV, "0")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "hub"


def test_vgg16_without_weights_is_a_one_line_config_error(empty_hub):
    with pytest.raises(ConfigError) as error:
        perceptual_loss("vgg16")
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.perceptual_weights:")
    assert "model.perceptual_weights=/path/to/vgg16-397923af.pth" in message and str(empty_hub) in message
    assert "downloads are off (FACEGEN_ALLOW_DOWNLOAD=0)" in message
    with pytest.raises(ConfigError, match="no file"):
        perceptual_loss("vgg16", weights=str(empty_hub / "missing.pth"))
    with pytest.raises(ConfigError, match="backbone"):
        perceptual_loss("alexnet")


def test_vgg16_downloads_by_default_like_inception_and_a_failed_download_is_one_line(empty_hub, monkeypatch):
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV)
    attempts = []

    def offline(url, path, hash_prefix=None):
        attempts.append((url, hash_prefix))
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as error:
        vgg16_weights_path()
    assert attempts == [("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af")]
    assert str(error.value).startswith("model.perceptual_weights: could not download VGG16 (OSError)")
    assert "\n" not in str(error.value)


def test_vgg16_weights_are_looked_up_in_order(empty_hub, tmp_path):
    not_vgg = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, not_vgg)
    with pytest.raises(ConfigError, match="not a torchvision vgg16 state dict"):
        perceptual_loss("vgg16", weights=str(not_vgg))  # fails before building the network
    cached = empty_hub / "checkpoints" / VGG16_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert vgg16_weights_path() == cached
    assert vgg16_weights_path(str(not_vgg)) == not_vgg  # an explicit path wins over the cache


@pytest.mark.slow
def test_vgg16_lpips_loads_a_local_state_dict(empty_hub, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("lpips")
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)

    loss = perceptual_loss("vgg16", weights=str(path))
    assert [p for p in loss.parameters() if p.requires_grad] == []
    assert torch.equal(getattr(loss.net.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(loss.net.net.slice5, "28").bias, state["features.28.bias"])
    heads = torch.load(
        os.path.join(os.path.dirname(__import__("lpips").__file__), "weights/v0.1/vgg.pth"),
        map_location="cpu",
        weights_only=True,
    )
    assert torch.equal(loss.net.lin0.model[1].weight, heads["lin0.model.1.weight"])  # the package's heads, loaded

    images, others = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.allclose(loss(images, images), torch.zeros(2))
    distance = loss(images, others)
    assert distance.shape == (2,) and (distance > 0).all()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_gradients(dropout):
    torch.manual_seed(0)
    plain = tiny_vqgan(4, num_res_blocks=2, dropout=dropout)
    checkpointed = tiny_vqgan(4, num_res_blocks=2, dropout=dropout)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpoint_blocks({"vqvae": checkpointed}, (ResnetBlock, AttnBlock), "vqgan") == sum(
        isinstance(m, (ResnetBlock, AttnBlock)) for m in plain.modules()
    )
    calls = []
    # pre: recompute stops early
    checkpointed.decoder.up[0].block[0]._checkpoint_wrapped_module.register_forward_pre_hook(
        lambda *args: calls.append(1)
    )
    images = torch.rand(2, 3, 32, 32)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        reconstruction, _, loss, _ = model(images)
        (F.mse_loss(reconstruction, images) + loss).backward()
        grads.append(
            {
                name.replace("._checkpoint_wrapped_module", ""): p.grad
                for name, p in model.named_parameters()
                if p.requires_grad
            }
        )
    assert len(calls) == 2  # forward, then recomputed in backward: checkpointing is on
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name
    assert isinstance(checkpointed.decoder.up[0].block[0]._checkpoint_wrapped_module, ResnetBlock)


@pytest.mark.parametrize("norm", ["batch", "act", "none"])
def test_discriminator_phase_scores_the_fakes_as_the_generator_phase_read_them(norm):
    # With BatchNorm, D's phase must normalise the fakes as G's phase does (a fake-only batch): one
    # concatenated real+fake batch gave D(x_rec) -3.2 in D's phase and +0.3 in G's in a 64 px run,
    # so G trained against scores D never gave.
    from facegen_dist.config import load_config
    from facegen_dist.runs import build_method

    model = [o for o in TINY_VQGAN if o.startswith("model.")]
    cfg = load_config([], [*model, f"model.disc_norm={norm}", "model.disc_start_images=0", "model.disc_loss=hinge"])
    method = build_method(cfg.model, 32)
    torch.manual_seed(0)
    modules = method.build_modules()
    for module in modules.values():
        module.train()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    batch = method.prepare(MicroBatch(1000, images=images))
    _, g_stats = method.loss("generator", modules, batch)
    _, d_stats = method.loss("discriminator", modules, batch)
    # hinge: g_loss = -mean D(x_rec); D's parameters do not change between the two phases.
    assert d_stats["logits_fake"].item() == pytest.approx(-g_stats["g_loss"].item(), rel=1e-4, abs=1e-5)
