"""IntroVAE (Huang et al. 2018, Algorithm 1): the encoder doubles as the discriminator.

An encoder phase, then a decoder phase, each stepping its own network with its own optimizer, in the
algorithm's order (written out in `IntroVAEMethod`'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import Method, MicroBatch, Phase, normal_latents, plain_module
from facegen_dist.models.autoencoder import gaussian_kl
from facegen_dist.models.introvae import IntroDecoder, IntroEncoder, IntroVAEPair


@dataclass
class IntroVAEConfig:
    name: str = "introvae"
    latent_dim: int = 256
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    alpha: float = 0.25  # weight of the adversarial (introspective) terms
    beta: float = 0.05  # weight of L_AE
    margin: float = 110.0  # m: the encoder pushes L_REG of generated images above it
    vae_images: int = 0  # images trained as a plain VAE before the adversarial terms start
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


def reconstruction_error(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L_AE: 0.5 * squared error summed over pixels, averaged over the batch."""
    return 0.5 * F.mse_loss(reconstruction.float(), images.float(), reduction="none").flatten(1).sum(1).mean()


def regularisation(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_REG: KL(q(z|x) || N(0, I)), summed over dimensions, averaged over the batch."""
    return gaussian_kl(mean.float(), logvar.float()).mean()


def encoder_loss(
    real: tuple,
    rec: tuple,
    fake: tuple,
    l_ae: torch.Tensor,
    alpha: float,
    beta: float,
    margin: float,
    adversarial: bool,
) -> tuple[torch.Tensor, dict]:
    """L_E of Algorithm 1 from (mean, logvar) of X, ng(Xr) and ng(Xp)."""
    reg_real = regularisation(*real)
    loss = reg_real + beta * l_ae
    stats = {"reg_real": reg_real.detach(), "l_ae": l_ae.detach()}
    if adversarial:
        reg_rec, reg_fake = regularisation(*rec), regularisation(*fake)
        loss = loss + alpha * (F.relu(margin - reg_rec) + F.relu(margin - reg_fake))
        stats.update({"reg_rec": reg_rec.detach(), "reg_fake": reg_fake.detach()})
    return loss, stats


def decoder_loss(
    rec: tuple, fake: tuple, l_ae: torch.Tensor, alpha: float, beta: float, adversarial: bool
) -> tuple[torch.Tensor, dict]:
    """L_G of Algorithm 1 from (mean, logvar) of Xr and Xp under the updated encoder."""
    loss = beta * l_ae
    stats = {"l_ae": l_ae.detach()}
    if adversarial:
        reg_rec, reg_fake = regularisation(*rec), regularisation(*fake)
        loss = loss + alpha * (reg_rec + reg_fake)
        stats.update({"reg_rec": reg_rec.detach(), "reg_fake": reg_fake.detach()})
    return loss, stats


@dataclass
class IntroVAEBatch(MicroBatch):
    # Z and Zp travel with the micro-batch from the encoder phase to the decoder phase of the same step.
    latents: torch.Tensor | None = None  # Z, detached, from the encoder phase
    prior: torch.Tensor | None = None  # Zp


def _score_pair(encoder: nn.Module, reconstruction: torch.Tensor, fake: torch.Tensor) -> tuple[tuple, tuple]:
    """(mean, logvar) of Xr and of Xp, from one encoder forward of the concatenated batch.

    One forward, so the encoder's BatchNorm statistics are those of the pair, the same in both phases.
    """
    mean, logvar = encoder(torch.cat([reconstruction, fake]))
    size = len(reconstruction)
    return (mean[:size], logvar[:size]), (mean[size:], logvar[size:])


class IntroVAEMethod(Method):
    """Per batch X, in the order of the paper's Algorithm 1:

      encoder phase   Z ~ q(z|X) (reparameterised), Zp ~ N(0, I), Xr = Dec(Z), Xp = Dec(Zp)
                      L_AE  = 0.5 * ||Xr - X||^2                    (summed over pixels, mean over images)
                      L_E   = L_REG(Z) + alpha * ([m - L_REG(Enc(ng(Xr)))]+ + [m - L_REG(Enc(ng(Xp)))]+) + beta * L_AE
                      -> step the encoder
      decoder phase   Xr = Dec(Z), Xp = Dec(Zp)                     (same Z, Zp; the decoder has not moved)
                      L_G   = alpha * (L_REG(Enc(Xr)) + L_REG(Enc(Xp))) + beta * L_AE     (Enc: the updated encoder)
                      -> step the decoder

    L_REG is the KL of q(z|x) to N(0, I), summed over latent dimensions and averaged over the batch
    (inside the hinge too, as the authors' code does). Before `vae_images` the adversarial terms
    are off and it trains as the plain VAE (the authors' `num_vae` warm-up, counted in images).
    """

    config_class = IntroVAEConfig

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        try:
            return {
                "encoder": IntroEncoder(self.resolution, list(cfg.channels), cfg.latent_dim),
                "decoder": IntroDecoder(self.resolution, list(cfg.channels), cfg.latent_dim),
            }
        except ValueError as error:
            raise ConfigError(f"model.channels: {error}") from None

    def phases(self) -> list[Phase]:
        betas = tuple(self.cfg.betas)
        return [Phase("encoder", ("encoder",), betas=betas), Phase("decoder", ("decoder",), betas=betas)]

    def ema_modules(self) -> tuple[str, ...]:
        return ("encoder", "decoder")

    def prepare(self, batch: MicroBatch) -> IntroVAEBatch:
        return batch.extended(IntroVAEBatch)

    def adversarial(self, images_seen: int) -> bool:
        return images_seen >= self.cfg.vae_images

    def loss(self, phase, modules, batch: IntroVAEBatch):
        cfg, images, adversarial = self.cfg, batch.images, self.adversarial(batch.images_seen)
        # Each phase calls the other network through its plain module, so each DDP reducer only serves its own
        # phase. The decoder runs on Z and Zp separately in both phases: the same BatchNorm statistics, Xr and Xp.
        if phase == "encoder":
            encoder, decoder = modules["encoder"], plain_module(modules["decoder"])
            mean, logvar = encoder(images)
            latents = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
            prior = torch.randn_like(mean)
            batch.latents, batch.prior = latents.detach(), prior
            reconstruction, fake = decoder(latents), decoder(prior)
            rec = fake_stats = None
            if adversarial:
                rec, fake_stats = _score_pair(encoder, reconstruction.detach(), fake.detach())
            loss, stats = encoder_loss(
                (mean, logvar),
                rec,
                fake_stats,
                reconstruction_error(reconstruction, images),
                cfg.alpha,
                cfg.beta,
                cfg.margin,
                adversarial,
            )
            stats["mse"] = F.mse_loss(reconstruction.detach().float(), images.float())
            return loss, {**stats, "loss": loss.detach()}
        if batch.latents is None:
            raise RuntimeError("introvae: the decoder phase ran before the encoder phase on this batch")
        decoder, encoder = modules["decoder"], plain_module(modules["encoder"])
        reconstruction, fake = decoder(batch.latents), decoder(batch.prior)
        rec = fake_stats = None
        if adversarial:
            rec, fake_stats = _score_pair(encoder, reconstruction, fake)
        loss, stats = decoder_loss(
            rec, fake_stats, reconstruction_error(reconstruction, images), cfg.alpha, cfg.beta, adversarial
        )
        return loss, {**stats, "loss": loss.detach()}

    def sampling_protocol(self) -> dict:
        return {"latent": f"z ~ N(0, I), {self.cfg.latent_dim}-d", "decoder": "deterministic, EMA weights"}

    @torch.no_grad()
    def reconstruct(self, modules, images):
        mean, _ = modules["encoder"](images)
        return modules["decoder"](mean)

    @torch.no_grad()
    def sample(self, modules, num, generator):
        model = modules["decoder"]
        device = next(model.parameters()).device
        return model(normal_latents(num, model.latent_dim, generator, device))

    def latent_model(self, modules):
        return IntroVAEPair(modules["encoder"], modules["decoder"])
