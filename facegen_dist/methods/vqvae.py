"""VQ-VAE and VQ-VAE2: one phase, loss = recon_weight * MSE + quantizer loss (commitment, and codebook loss when learnt by loss).

Sampling needs a prior over the codes: that is the `pixelcnn_prior` method, trained as its own
stage on a finished VQ run (methods/prior.py). This method reconstructs and logs codebook health.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import Method, Phase
from facegen_dist.models.vqvae import VQVAE, VQVAE2


@dataclass
class VQVAEConfig:
    name: str = "vqvae2"  # vqvae (one code grid) | vqvae2 (top + bottom)
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    embed_dim: int = 64
    num_codes: int = 512
    downsample: int = 4  # bottom grid = resolution / downsample; VQ-VAE2's top grid is half of it
    beta: float = 0.25  # commitment weight
    codebook_update: str = "ema"  # ema | loss
    ema_decay: float = 0.99  # per forward pass: with train.grad_accum=k the codebook moves k times a step
    kmeans_init: bool = True  # codebook = k-means of the first batch's encoder outputs (all ranks)
    dead_code_steps: int = 100  # re-seed codes unused for this many forward passes (micro-batches; 0 = never)
    cosine: bool = False  # l2-normalised codes and latents
    recon_weight: float = 1.0


def build_vq_model(cfg, resolution: int) -> nn.Module:
    if cfg.codebook_update not in ("ema", "loss"):
        raise ConfigError(f"model.codebook_update: '{cfg.codebook_update}' is not one of ema, loss")
    if cfg.cosine and cfg.codebook_update == "loss":
        raise ConfigError("model.cosine: l2-normalised codes need model.codebook_update=ema")
    factor = cfg.downsample * (2 if cfg.name == "vqvae2" else 1)
    if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1) or resolution % factor or resolution // factor < 2:
        raise ConfigError(f"model.downsample: {cfg.downsample} does not fit {resolution} px ({cfg.name} needs a power of two with resolution/{factor} >= 2)")
    quant = dict(num_codes=cfg.num_codes, beta=cfg.beta, update=cfg.codebook_update, decay=cfg.ema_decay,
                 kmeans_init=cfg.kmeans_init, dead_code_steps=cfg.dead_code_steps, cosine=cfg.cosine)
    model_class = VQVAE2 if cfg.name == "vqvae2" else VQVAE
    return model_class(cfg.channels, cfg.res_blocks, cfg.res_channels, cfg.embed_dim, cfg.downsample, quant)


class VQVAEMethod(Method):
    config_class = VQVAEConfig

    def build_modules(self) -> dict[str, nn.Module]:
        return {"vqvae": build_vq_model(self.cfg, self.resolution)}

    def phases(self) -> list[Phase]:
        return [Phase("vqvae", ("vqvae",))]

    def ema_modules(self) -> tuple[str, ...]:
        return ("vqvae",)

    def loss(self, phase, modules, images):
        reconstruction, _, quantizer_loss, level_stats = modules["vqvae"](images)
        mse = F.mse_loss(reconstruction.float(), images.float())
        loss = self.cfg.recon_weight * mse + quantizer_loss
        stats = {"loss": loss.detach(), "mse": mse.detach(), "vq_loss": quantizer_loss.detach()}
        for level, level_stat in level_stats.items():
            stats.update({f"codebook_{level}/{name}": value for name, value in level_stat.items()})
        return loss, stats

    def sampling_protocol(self) -> dict:
        return {"samples": "none: train a pixelcnn_prior on this run to sample"}

    @torch.no_grad()
    def reconstruct(self, modules, images):
        reconstruction, _, _, _ = modules["vqvae"](images)
        return reconstruction

    def figures(self, modules, out_dir: Path, tag: str) -> dict[str, str]:
        from facegen_dist.log.figures import codebook_usage_figure

        model = modules["vqvae"]
        usage = {level: quantizer.usage() for level, quantizer in model.quantizers().items()}
        path = out_dir / f"codebook_usage_{tag}.png"
        codebook_usage_figure(usage, path)
        return {"codebook_usage": str(path)}
