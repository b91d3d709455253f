"""DCGAN baseline: a discriminator phase, then a generator phase, each with its own Adam (betas 0.5, 0.999).

D learns from loss(D(x), D(G(z))), z ~ N(0, I) drawn per step and G under no_grad; G from the adversarial
loss of D(G(z')) for a fresh z' (vanilla: -log sigmoid, the paper's non-saturating form; or hinge: -D).
The generator has an EMA copy, which draws the samples and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import Method, Phase, normal_latents, plain_module
from facegen_dist.models.dcgan import DCGANDiscriminator, DCGANGenerator
from facegen_dist.models.gan_losses import discriminator_loss, generator_adversarial_loss, score_real_and_fake


@dataclass
class DCGANConfig:
    name: str = "dcgan"
    latent_dim: int = 100
    gen_channels: int = 64  # width at the largest generator map; doubles as maps halve
    disc_channels: int = 64
    max_channels: int = 512
    disc_batch_norm: bool = True
    loss: str = "vanilla"  # vanilla (BCE, non-saturating generator) | hinge
    gen_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    disc_lr: float = 0.0  # 0: optim.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


class DCGANMethod(Method):
    config_class = DCGANConfig

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        if cfg.loss not in ("vanilla", "hinge"):
            raise ConfigError(f"model.loss: '{cfg.loss}' is not one of vanilla, hinge")
        try:
            return {
                "generator": DCGANGenerator(self.resolution, cfg.latent_dim, cfg.gen_channels, cfg.max_channels),
                "discriminator": DCGANDiscriminator(
                    self.resolution, cfg.disc_channels, cfg.max_channels, cfg.disc_batch_norm
                ),
            }
        except ValueError as error:
            raise ConfigError(f"data.resolution: {error}") from None

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [
            Phase("discriminator", ("discriminator",), lr=cfg.disc_lr or None, betas=tuple(cfg.disc_betas)),
            Phase("generator", ("generator",), betas=tuple(cfg.gen_betas)),
        ]

    def ema_modules(self) -> tuple[str, ...]:
        return ("generator",)

    def _latents(self, num: int, device) -> torch.Tensor:
        return torch.randn(num, self.cfg.latent_dim, device=device)  # the rank's own RNG stream, restored on resume

    def loss(self, phase, modules, batch):
        images = batch.images
        latents = self._latents(images.shape[0], images.device)
        if phase == "discriminator":
            with torch.no_grad():
                fake = plain_module(modules["generator"])(latents)
            # Separate forwards: D's BatchNorm sees a fake-only batch, as in the generator's phase.
            logits_real, logits_fake = score_real_and_fake(modules["discriminator"], images, fake)
            d_loss = discriminator_loss(logits_real, logits_fake, self.cfg.loss)
            return d_loss, {
                "d_loss": d_loss.detach(),
                "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean(),
            }
        # D's plain module: D's DDP reducer is only used by D's own phase.
        logits_fake = plain_module(modules["discriminator"])(modules["generator"](latents)).float()
        g_loss = generator_adversarial_loss(logits_fake, self.cfg.loss)
        return g_loss, {"g_loss": g_loss.detach(), "loss": g_loss.detach()}

    def sampling_protocol(self) -> dict:
        return {
            "latent": f"z ~ N(0, I), {self.cfg.latent_dim}-d",
            "generator": "EMA weights, BatchNorm running statistics",
        }

    @torch.no_grad()
    def sample(self, modules, num, generator):
        model = modules["generator"]
        device = next(model.parameters()).device
        return model(normal_latents(num, model.latent_dim, generator, device))
