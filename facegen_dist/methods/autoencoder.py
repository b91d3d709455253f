"""AE and VAE: one phase, loss = recon_weight * MSE (+ kl_weight * KL for the VAE)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import Method, Phase, normal_latents
from facegen_dist.models.autoencoder import ConvAutoencoder, gaussian_kl


@dataclass
class AutoencoderConfig:
    name: str = "vae"  # ae | vae
    latent_dim: int = 200
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    recon_weight: float = 1000.0  # the slides' 1000 * MSE
    kl_weight: float = 1.0


class AutoencoderMethod(Method):
    config_class = AutoencoderConfig

    @property
    def variational(self) -> bool:
        return self.cfg.name == "vae"

    def __init__(self, model_cfg, resolution: int):
        super().__init__(model_cfg, resolution)
        channels, halvings = list(model_cfg.channels), 2 ** len(model_cfg.channels)
        if model_cfg.latent_dim <= 0:
            raise ConfigError(f"model.latent_dim: {model_cfg.latent_dim} must be > 0")
        if not channels or min(channels) <= 0:
            raise ConfigError(f"model.channels: {channels} needs one or more positive widths")
        if resolution % halvings or resolution < halvings:
            raise ConfigError(
                f"model.channels: {len(channels)} entries halve {resolution} px {len(channels)} times; "
                f"data.resolution must be a multiple of {halvings} (or give fewer entries)"
            )

    def build_modules(self) -> dict[str, nn.Module]:
        return {
            "autoencoder": ConvAutoencoder(
                self.resolution, list(self.cfg.channels), self.cfg.latent_dim, self.variational
            )
        }

    def phases(self) -> list[Phase]:
        return [Phase("autoencoder", ("autoencoder",))]

    def ema_modules(self) -> tuple[str, ...]:
        return ("autoencoder",)

    def loss(self, phase, modules, batch):
        images = batch.images
        reconstruction, mean, logvar = modules["autoencoder"](images)
        # Losses in fp32 whatever the autocast dtype: 1000 * MSE in bf16 loses the small terms.
        mse = F.mse_loss(reconstruction.float(), images.float(), reduction="none").flatten(1).mean(1)
        stats = {"mse": mse.mean().detach()}
        loss = self.cfg.recon_weight * mse.mean()
        if logvar is not None:
            kl = gaussian_kl(mean.float(), logvar.float()).mean()
            loss = loss + self.cfg.kl_weight * kl
            stats["kl"] = kl.detach()
        stats["loss"] = loss.detach()
        return loss, stats

    def sampling_protocol(self) -> dict:
        return {"latent": f"z ~ N(0, I), {self.cfg.latent_dim}-d", "decoder": "deterministic"}

    @torch.no_grad()
    def reconstruct(self, modules, images):
        reconstruction, _, _ = modules["autoencoder"](images)
        return reconstruction

    @torch.no_grad()
    def sample(self, modules, num, generator):
        model = modules["autoencoder"]
        device = next(model.parameters()).device
        latents = normal_latents(num, model.latent_dim, generator, device)
        return model.decode(latents)

    def latent_model(self, modules):
        return modules["autoencoder"]
