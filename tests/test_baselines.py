"""DCGAN and IntroVAE baselines: shapes, IntroVAE's loss terms by hand, the algorithm's order, 2-process runs with exact resume."""

import json
import math

import pytest
import torch
from helpers import (
    TINY_DCGAN,
    TINY_INTROVAE,
    kill9_after_first_checkpoint,
    read_metrics,
    run_train,
    start_train,
)

from facegen_dist.methods import MicroBatch
from facegen_dist.methods.introvae import decoder_loss, encoder_loss, reconstruction_error
from facegen_dist.models.dcgan import DCGANDiscriminator, DCGANGenerator


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_dcgan_shapes_and_ranges(resolution):
    generator, discriminator = (
        DCGANGenerator(resolution, latent_dim=12, channels=8),
        DCGANDiscriminator(resolution, channels=8),
    )
    images = generator(torch.randn(3, 12))
    assert images.shape == (3, 3, resolution, resolution)
    assert images.min() >= 0 and images.max() <= 1
    assert discriminator(images).shape == (3,)
    with pytest.raises(ValueError):
        DCGANGenerator(48)


def test_introvae_loss_terms_match_a_hand_computed_example():
    # KL(N(m, e^lv) || N(0, 1)) = 0.5 * sum(m^2 + e^lv - 1 - lv)
    real = (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))  # 0.5 * 1 = 0.5
    rec = (torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(2.0), 0.0]]))  # 0.5 * (2 - 1 - ln 2)
    fake = (torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))  # 0.5 * 4 = 2
    reg_real, reg_rec, reg_fake = 0.5, 0.5 * (1 - math.log(2.0)), 2.0
    l_ae = reconstruction_error(torch.tensor([[[[0.5, 1.0]]]]), torch.zeros(1, 1, 1, 2))
    assert l_ae.item() == pytest.approx(0.5 * (0.25 + 1.0))
    alpha, beta, margin = 0.25, 2.0, 1.0

    loss_e, stats = encoder_loss(real, rec, fake, l_ae, alpha, beta, margin, adversarial=True)
    # L_E = L_REG(Z) + alpha * ([m - L_REG(Zr)]+ + [m - L_REG(Zpp)]+) + beta * L_AE; the fake's hinge is 0 (2 > m)
    assert loss_e.item() == pytest.approx(reg_real + alpha * (margin - reg_rec) + beta * 0.625)
    assert stats["reg_rec"].item() == pytest.approx(reg_rec) and stats["reg_fake"].item() == pytest.approx(reg_fake)
    loss_g, _ = decoder_loss(rec, fake, l_ae, alpha, beta, adversarial=True)
    assert loss_g.item() == pytest.approx(alpha * (reg_rec + reg_fake) + beta * 0.625)
    # During the VAE warm-up only L_REG(Z) + beta * L_AE and beta * L_AE remain.
    assert encoder_loss(real, None, None, l_ae, alpha, beta, margin, adversarial=False)[0].item() == pytest.approx(
        reg_real + beta * 0.625
    )
    assert decoder_loss(None, None, l_ae, alpha, beta, adversarial=False)[0].item() == pytest.approx(beta * 0.625)


def test_introvae_decoder_phase_uses_the_same_latents_and_the_updated_encoder():
    from facegen_dist.config import load_config
    from facegen_dist.methods.introvae import regularisation
    from facegen_dist.runs import build_method

    cfg = load_config([], [o for o in TINY_INTROVAE if o.startswith("model.")] + ["model.vae_images=0"])
    method = build_method(cfg.model, 32)
    torch.manual_seed(0)
    modules = method.build_modules()
    images = torch.rand(4, 3, 32, 32)
    batch = method.prepare(MicroBatch(1000, images=images))
    method.loss("encoder", modules, batch)
    latents, prior = batch.latents, batch.prior
    with torch.no_grad():  # "the encoder's optimizer step"
        for parameter in modules["encoder"].parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    loss, stats = method.loss("decoder", modules, batch)
    reconstruction, fake = modules["decoder"](latents), modules["decoder"](prior)
    mean, logvar = modules["encoder"](torch.cat([reconstruction, fake]))
    expected_rec = regularisation(mean[:4], logvar[:4])
    assert stats["reg_rec"].item() == pytest.approx(expected_rec.item(), rel=1e-5)
    assert stats["l_ae"].item() == pytest.approx(reconstruction_error(reconstruction, images).item(), rel=1e-5)
    with pytest.raises(RuntimeError, match="before the encoder phase"):
        method.loss("decoder", modules, method.prepare(MicroBatch(1000, images=images)))


def _resume_args(base, name):
    return [
        *base,
        f"run.name={name}",
        "train.total_images=1280",
        "train.log_every_images=16",
        "train.ckpt_every_images=480",
        "train.sample_every_images=100000",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "tiny, keys",
    [
        (TINY_DCGAN, ("discriminator/d_loss", "generator/g_loss", "discriminator/logits_real")),
        (TINY_INTROVAE, ("encoder/loss", "decoder/loss", "encoder/reg_real", "decoder/l_ae")),
    ],
    ids=["dcgan", "introvae"],
)
def test_two_processes_train_and_resume_exactly_after_kill9(tmp_path, tiny_shards, tiny, keys):
    data = f"data.path={tiny_shards}"
    reference = run_train(
        tmp_path, *_resume_args(tiny, "reference"), data, "train.ckpt_every_images=100000", num_processes=2
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "reference" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert (tmp_path / "runs" / "reference" / "samples" / "samples_final.png").is_file()

    crashed = tmp_path / "runs" / "crashed"
    kill9_after_first_checkpoint(start_train(tmp_path, *_resume_args(tiny, "crashed"), data), crashed)
    resumed = run_train(tmp_path, *_resume_args(tiny, "crashed"), data, num_processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = read_metrics(tmp_path / "runs" / "reference"), read_metrics(crashed)
    assert [row["step"] for row in got] == list(range(1, 81))
    for want, have in zip(expected, got):
        for key in keys:
            assert math.isfinite(have[key])
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    final = json.loads((crashed / "summary.json").read_text())
    assert final["parameter_checksums"] == summary["parameter_checksums"]
