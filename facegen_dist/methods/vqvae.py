"""VQ-VAE and VQ-VAE2: one phase, loss = recon_weight * MSE + quantizer loss (commitment, and codebook loss when learnt by loss).

Sampling needs a prior over the codes: that is the `pixelcnn_prior` method, trained as its own
stage on a finished VQ run (methods/prior.py). This method reconstructs and logs codebook health.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import Method, Phase
from facegen_dist.models.vqvae import VQVAE, VQVAE2, ResBlock

NO_GAUSSIAN_PRIOR = (
    "no N(0, I) prior: a VQ model samples from a PixelCNN prior over its codes; train a pixelcnn_prior "
    "with model.vq_run=<this run> and sample with `facegen sample --run <that prior run>`"
)


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
    # vqvae2: the top encoder's width after its strided conv; 0 = channels (the original layout, which
    # old run folders hold), channels // 2 = rosinality/vq-vae-2-pytorch's (0.2 M fewer parameters at 128).
    top_encoder_channels: int = 0


def build_vq_model(cfg, resolution: int) -> nn.Module:
    if cfg.codebook_update not in ("ema", "loss"):
        raise ConfigError(f"model.codebook_update: '{cfg.codebook_update}' is not one of ema, loss")
    if cfg.cosine and cfg.codebook_update == "loss":
        raise ConfigError("model.cosine: l2-normalised codes need model.codebook_update=ema")
    factor = cfg.downsample * (2 if cfg.name == "vqvae2" else 1)
    if cfg.downsample < 2 or cfg.downsample & (cfg.downsample - 1) or resolution % factor or resolution // factor < 2:
        raise ConfigError(
            f"model.downsample: {cfg.downsample} does not fit {resolution} px ({cfg.name} needs a power of two with resolution/{factor} >= 2)"
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
    if cfg.top_encoder_channels < 0 or (cfg.top_encoder_channels and cfg.name != "vqvae2"):
        raise ConfigError(
            f"model.top_encoder_channels: {cfg.top_encoder_channels} needs model.name=vqvae2 and a value >= 0 (0 = model.channels)"
        )
    if cfg.name == "vqvae2":
        return VQVAE2(
            cfg.channels,
            cfg.res_blocks,
            cfg.res_channels,
            cfg.embed_dim,
            cfg.downsample,
            quant,
            cfg.top_encoder_channels,
        )
    return VQVAE(cfg.channels, cfg.res_blocks, cfg.res_channels, cfg.embed_dim, cfg.downsample, quant)


class PreQuantLatent(nn.Module):
    """A VQ model as the latent-space tools see it: every level's pre-quantisation latent, flattened and concatenated.

    decode snaps each level to its nearest codes and decodes, so decode(encode(x)) is the model's
    reconstruction and any latent it is given (an interpolation, an attribute shift) is decoded
    as a code grid. decode only looks codes up; encode runs the model's quantizers, so keep the model
    in eval mode (as restore_run gives it), where they do not update.
    """

    no_gaussian_prior = NO_GAUSSIAN_PRIOR

    def __init__(self, model: VQVAE | VQVAE2, embed_dim: int, resolution: int):
        super().__init__()
        self.model = model
        self.shapes = {level: (embed_dim, *grid) for level, grid in model.grid_shapes(resolution).items()}
        self.latent_description = (
            "pre-quantisation latent: "
            + " + ".join(f"{level} {'x'.join(map(str, shape[1:]))}x{shape[0]}" for level, shape in self.shapes.items())
            + f" = {sum(math.prod(shape) for shape in self.shapes.values())} dims"
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        latents = self.model.encode_latents(images)
        return torch.cat([latents[level].flatten(1) for level in self.shapes], 1), None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        quantizers = self.model.quantizers()
        quantized = {}
        for (level, shape), flat in zip(self.shapes.items(), latents.float().split(sizes, dim=1)):
            rows = flat.reshape(-1, *shape).permute(0, 2, 3, 1).reshape(-1, shape[0])
            quantized[level] = quantizers[level].lookup(quantizers[level].nearest(rows).view(-1, *shape[1:]))
        return self.model.decode(quantized)


class VQVAEMethod(Method):
    config_class = VQVAEConfig

    def checkpoint_blocks(self) -> tuple[type[nn.Module], ...]:
        return (ResBlock,)

    def build_modules(self) -> dict[str, nn.Module]:
        return {"vqvae": build_vq_model(self.cfg, self.resolution)}

    def phases(self) -> list[Phase]:
        return [Phase("vqvae", ("vqvae",))]

    def ema_modules(self) -> tuple[str, ...]:
        return ("vqvae",)

    def loss(self, phase, modules, batch):
        images = batch.images
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

    def latent_model(self, modules):
        return PreQuantLatent(modules["vqvae"], self.cfg.embed_dim, self.resolution)

    def figures(self, modules, out_dir: Path, tag: str) -> dict[str, str]:
        from facegen_dist.log.figures import codebook_usage_figure

        model = modules["vqvae"]
        usage = {level: quantizer.usage() for level, quantizer in model.quantizers().items()}
        path = out_dir / f"codebook_usage_{tag}.png"
        codebook_usage_figure(usage, path)
        return {"codebook_usage": str(path)}
