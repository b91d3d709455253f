import pytest
import torch
from torch.distributions import Normal, kl_divergence

from facegen_dist.config import load_config
from facegen_dist.methods import MicroBatch
from facegen_dist.models.autoencoder import ConvAutoencoder, gaussian_kl
from facegen_dist.runs import build_method


@pytest.mark.parametrize("variational", [False, True])
@pytest.mark.parametrize("resolution", [32, 64])
def test_autoencoder_shapes(variational, resolution):
    model = ConvAutoencoder(resolution, [8, 16, 16, 32, 32], latent_dim=12, variational=variational)
    images = torch.rand(3, 3, resolution, resolution)
    reconstruction, mean, logvar = model(images)
    assert reconstruction.shape == images.shape
    assert 0 <= reconstruction.min() and reconstruction.max() <= 1
    assert mean.shape == (3, 12)
    assert (logvar is not None) == variational
    assert model.decode(torch.randn(5, 12)).shape == (5, 3, resolution, resolution)


def test_five_strided_convs_as_in_the_slides():
    model = ConvAutoencoder(64, [32, 64, 128, 256, 512], latent_dim=200, variational=True)
    strided = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(strided) == 5 and all(m.stride == (2, 2) for m in strided)
    assert model.to_mean.out_features == 200 and model.to_logvar.out_features == 200


def test_resolution_must_divide():
    with pytest.raises(ValueError, match="not divisible"):
        ConvAutoencoder(16, [8, 8, 8, 8, 8], latent_dim=4, variational=False)


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(4, 6), torch.randn(4, 6)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(gaussian_kl(mean, logvar), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_method_loss_is_recon_weight_mse_plus_kl(name, tiny_shards):
    cfg = load_config(
        [],
        [
            f"model.name={name}",
            "model.channels=[8,8,8,8,8]",
            "model.latent_dim=4",
            "model.recon_weight=1000",
            f"data.path={tiny_shards}",
        ],
    )
    method = build_method(cfg.model, 32)
    modules = method.build_modules()
    modules["autoencoder"].eval()  # deterministic: no reparameterisation noise
    images = torch.rand(2, 3, 32, 32)
    loss, stats = method.loss("autoencoder", modules, MicroBatch(0, images=images))
    expected = 1000 * stats["mse"] + (stats["kl"] if name == "vae" else 0)
    assert torch.allclose(loss, expected)
    assert ("kl" in stats) == (name == "vae")
    assert method.sample(modules, 3, torch.Generator().manual_seed(0)).shape == (3, 3, 32, 32)
