"""VQ-GAN (Esser et al. 2021): a VQ autoencoder trained with L1 + perceptual + codebook losses and a patch discriminator.

Two phases per step, generator then discriminator, each with its own optimizer (taming-transformers'
recipe). Design notes (the losses, what this does differently from taming and why): docs/vqgan.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import MicroBatch, Phase, plain_module
from facegen_dist.methods.vqvae import VQVAEMethod
from facegen_dist.models.discriminator import PatchDiscriminator
from facegen_dist.models.gan_losses import (
    adaptive_generator_weight,
    disc_factor,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    score_real_and_fake,
)
from facegen_dist.models.vqgan import VQGAN, AttnBlock, Downsample, ResnetBlock, Upsample
from facegen_dist.weights import perceptual_loss


@dataclass
class VQGANConfig:
    name: str = "vqgan"
    channels: int = 128  # taming's ch
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # downsampling f = 2 ** (len - 1)
    res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # feature-map sides with self-attention
    z_channels: int = 256
    embed_dim: int = 256
    dropout: float = 0.0
    num_codes: int = 1024
    beta: float = 0.25
    codebook_update: str = "ema"  # ema | loss
    ema_decay: float = 0.99
    kmeans_init: bool = True
    dead_code_steps: int = 100
    cosine: bool = False
    recon_loss: str = "l1"  # l1 | l2
    recon_weight: float = 1.0
    # vgg16 (LPIPS) | avatar (LPIPS form over the shipped avatar network: offline, avatars only) | tiny (tests only) | none
    perceptual: str = "vgg16"
    perceptual_weight: float = 1.0
    perceptual_weights: str = (
        ""  # torchvision vgg16 state dict (.pth) for offline machines; for avatar: another extractor
    )
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: str = "batch"  # batch | act (ActNorm, data-initialised identically on every rank) | none
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_start_images: int = 0  # images seen before the discriminator turns on
    disc_weight: float = 0.8  # multiplies the adaptive weight
    disc_factor: float = 1.0
    adaptive_weight_max: float = 1.0e4
    feature_matching_weight: float = 0.0  # L1 between D's features of real and reconstructed images
    gen_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    disc_lr: float = 0.0  # 0: optim.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])


@dataclass
class VQGANBatch(MicroBatch):
    reconstruction: torch.Tensor | None = None  # the generator phase's, detached: what the discriminator scores


def build_vqgan(cfg, resolution: int) -> VQGAN:
    for key, value, allowed in (
        ("codebook_update", cfg.codebook_update, ("ema", "loss")),
        ("recon_loss", cfg.recon_loss, ("l1", "l2")),
        ("perceptual", cfg.perceptual, ("vgg16", "avatar", "tiny", "none")),
        ("disc_loss", cfg.disc_loss, ("hinge", "vanilla")),
        ("disc_norm", cfg.disc_norm, ("batch", "act", "none")),
    ):
        if value not in allowed:
            raise ConfigError(f"model.{key}: '{value}' is not one of {', '.join(allowed)}")
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if len(cfg.channel_mult) < 2 or resolution % factor or resolution // factor < 2:
        raise ConfigError(
            f"model.channel_mult: {len(cfg.channel_mult)} levels downsample by {factor}, which does not fit {resolution} px"
        )
    quant = dict(
        num_codes=cfg.num_codes,
        beta=cfg.beta,
        update=cfg.codebook_update,
        decay=cfg.ema_decay,
        kmeans_init=cfg.kmeans_init,
        dead_code_steps=cfg.dead_code_steps,
        cosine=cfg.cosine,
    )
    return VQGAN(
        ch=cfg.channels,
        ch_mult=tuple(cfg.channel_mult),
        num_res_blocks=cfg.res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        resolution=resolution,
        embed_dim=cfg.embed_dim,
        z_channels=cfg.z_channels,
        dropout=cfg.dropout,
        quant=quant,
    )


class VQGANMethod(VQVAEMethod):
    """The autoencoder is the module "vqvae" (so codes, priors, sampling and the latent tool read it as any VQ model)."""

    config_class = VQGANConfig

    def checkpoint_blocks(self) -> tuple[type[nn.Module], ...]:
        # The autoencoder's; resampling too (Upsample saves its 4x larger interpolated input otherwise). The
        # patch discriminator keeps its activations: they are small, and its BatchNorm must not run twice.
        return (ResnetBlock, AttnBlock, Downsample, Upsample)

    def __init__(self, model_cfg, resolution: int):
        super().__init__(model_cfg, resolution)
        self.perceptual: nn.Module | None = None  # frozen, kept out of the modules: not trained, not checkpointed

    def prepare_training(self) -> None:
        """The perceptual network: only training needs it (a restored run samples and encodes without VGG weights)."""
        if self.cfg.perceptual != "none" and self.cfg.perceptual_weight > 0:
            self.perceptual = perceptual_loss(self.cfg.perceptual, self.cfg.perceptual_weights)

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        return {
            "vqvae": build_vqgan(cfg, self.resolution),
            "discriminator": PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers, norm=cfg.disc_norm),
        }

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        return [
            Phase("generator", ("vqvae",), betas=tuple(cfg.gen_betas)),
            Phase("discriminator", ("discriminator",), lr=cfg.disc_lr or None, betas=tuple(cfg.disc_betas)),
        ]

    def prepare(self, batch: MicroBatch) -> VQGANBatch:
        return batch.extended(VQGANBatch)

    def disc_on(self, images_seen: int) -> bool:
        return images_seen >= self.cfg.disc_start_images

    def phase_active(self, phase: str, images_seen: int) -> bool:
        # Skipped, not stepped with a zero loss (taming): no compute spent, no D optimizer state moves.
        return phase != "discriminator" or self.disc_on(images_seen)

    def loss(self, phase, modules, batch):
        if phase == "generator":
            return self._generator_loss(modules, batch)
        return self._discriminator_loss(modules, batch)

    def _reconstruction_loss(self, reconstruction: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        difference = reconstruction.float() - images.float()
        rec = difference.abs().mean() if cfg.recon_loss == "l1" else difference.pow(2).mean()
        nll = cfg.recon_weight * rec
        stats = {"rec": rec.detach(), "mse": difference.detach().pow(2).mean()}
        if self.perceptual is not None:
            self.perceptual.to(images.device)
            perceptual = self.perceptual(reconstruction.float(), images.float()).mean()
            nll = nll + cfg.perceptual_weight * perceptual
            stats["perceptual"] = perceptual.detach()
        return nll, stats

    def _generator_loss(self, modules, batch: VQGANBatch):
        cfg, images, images_seen = self.cfg, batch.images, batch.images_seen
        reconstruction, _, quantizer_loss, level_stats = modules["vqvae"](images)
        # D scores these (taming recomputes them after G's step): saves a forward; an EMA codebook sees each batch once.
        batch.reconstruction = reconstruction.detach()
        nll, stats = self._reconstruction_loss(reconstruction, images)
        loss = nll + quantizer_loss
        if self.disc_on(images_seen):
            # D's plain module, not its DDP wrapper: D's reducer only serves D's phase (no unused-parameter hangs)
            discriminator = plain_module(modules["discriminator"])
            logits_fake, fake_features = discriminator(reconstruction, return_features=True)
            g_loss = generator_adversarial_loss(logits_fake, cfg.disc_loss)
            adaptive = adaptive_generator_weight(
                nll, g_loss, plain_module(modules["vqvae"]).last_layer(), cfg.adaptive_weight_max
            )
            weight = adaptive.weight * cfg.disc_weight
            factor = disc_factor(images_seen, cfg.disc_start_images, cfg.disc_factor)
            loss = loss + factor * weight * g_loss
            # adaptive_weight_zeroed: the fraction of micro-batches whose weight was forced to 0 (non-finite or zero gradients)
            stats.update(
                {
                    "g_loss": g_loss.detach(),
                    "adaptive_weight": weight,
                    "adaptive_weight_zeroed": torch.tensor(float(adaptive.reason is not None)),
                }
            )
            if cfg.feature_matching_weight > 0:
                with torch.no_grad():
                    _, real_features = discriminator(images, return_features=True)
                matching = feature_matching_loss(real_features, fake_features)
                loss = loss + cfg.feature_matching_weight * matching
                stats["feature_matching"] = matching.detach()
        stats.update({"loss": loss.detach(), "vq_loss": quantizer_loss.detach()})
        for level, level_stat in level_stats.items():
            stats.update({f"codebook_{level}/{name}": value for name, value in level_stat.items()})
        return loss, stats

    def _discriminator_loss(self, modules, batch: VQGANBatch):
        cfg = self.cfg
        if batch.reconstruction is None:
            raise RuntimeError("vqgan: the discriminator phase ran before the generator phase on this batch")
        logits_real, logits_fake = score_real_and_fake(modules["discriminator"], batch.images, batch.reconstruction)
        d_loss = discriminator_loss(logits_real, logits_fake, cfg.disc_loss)
        loss = disc_factor(batch.images_seen, cfg.disc_start_images, cfg.disc_factor) * d_loss
        return loss, {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }

    def sampling_protocol(self) -> dict:
        return {"samples": "none: train a gpt_prior on this run to sample"}
