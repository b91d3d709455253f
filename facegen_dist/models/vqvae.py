"""VQ-VAE (one latent grid) and VQ-VAE2 (top and bottom grids), after Razavi et al. 2019.

The layout of rosinality/vq-vae-2-pytorch (docs/vqvae.md). The downsampling is a config value, so the
grids follow the resolution (e.g. 32x32 top / 64x64 bottom at 256 px with downsample=4). Images are in
[0, 1]; the network works on [-1, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from facegen_dist.models.quantizer import VectorQuantizer


class ResBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _halvings(factor: int) -> int:
    steps = int(math.log2(factor))
    if factor < 2 or 2**steps != factor:
        raise ValueError(f"downsampling factor {factor} is not a power of two >= 2")
    return steps


class Encoder(nn.Module):
    """`factor`x down: stride-2 4x4 convs, a 3x3 conv, residual blocks.

    `last_stride_channels` is the width out of the last strided conv (0: `channels`). rosinality's
    2x top encoder narrows there (channels // 2, then the 3x3 conv widens back to `channels`).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        res_blocks: int,
        res_channels: int,
        factor: int,
        last_stride_channels: int = 0,
    ):
        super().__init__()
        steps, layers, width = _halvings(factor), [], in_channels
        for index in range(steps):
            out = (last_stride_channels or channels) if index == steps - 1 else channels // 2
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            width = out
        layers += [nn.Conv2d(width, channels, 3, padding=1)]
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)]
        self.net = nn.Sequential(*layers, nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """`factor`x up: a 3x3 conv, residual blocks, stride-2 4x4 transposed convs."""

    def __init__(
        self, in_channels: int, out_channels: int, channels: int, res_blocks: int, res_channels: int, factor: int
    ):
        super().__init__()
        steps = _halvings(factor)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        layers += [ResBlock(channels, res_channels) for _ in range(res_blocks)]
        layers += [nn.ReLU(inplace=True)]
        width = channels
        for index in range(steps):
            last = index == steps - 1
            out = out_channels if last else channels // 2
            layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1)]
            if not last:
                layers += [nn.ReLU(inplace=True)]
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _quantizer(embed_dim: int, quant: dict) -> VectorQuantizer:
    return VectorQuantizer(dim=embed_dim, **quant)


class OneGridVQ(nn.Module):
    """The interface of a VQ model with one code grid ("bottom"), which codes, priors, sampling and the latent
    tools rely on. A subclass sets `downsample` and `quantize` and defines `encode_latents` and `decode`."""

    levels = ("bottom",)
    downsample: int
    quantize: VectorQuantizer

    def grid_shapes(self, resolution: int) -> dict[str, tuple[int, int]]:
        side = resolution // self.downsample
        return {"bottom": (side, side)}

    def quantizers(self) -> dict[str, VectorQuantizer]:
        return {"bottom": self.quantize}

    def encode_latents(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-quantisation latent per level, {level: [B, D, h, w]}: what the quantizer sees."""
        raise NotImplementedError

    def decode(self, quantized: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor):
        """-> (quantized maps per level, code indices per level, quantizer loss, stats per level)."""
        quantized, indices, loss, stats = self.quantize(self.encode_latents(images)["bottom"])
        return {"bottom": quantized}, {"bottom": indices}, loss, {"bottom": stats}

    def decode_codes(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode({"bottom": self.quantize.lookup(codes["bottom"])})

    def forward(self, images: torch.Tensor):
        quantized, indices, loss, stats = self.encode(images)
        return self.decode(quantized), indices, loss, stats


class VQVAE(OneGridVQ):
    """One code grid at 1/`downsample` of the image."""

    def __init__(
        self,
        channels: int = 128,
        res_blocks: int = 2,
        res_channels: int = 32,
        embed_dim: int = 64,
        downsample: int = 4,
        quant: dict | None = None,
    ):
        super().__init__()
        self.downsample = downsample
        self.encoder = Encoder(3, channels, res_blocks, res_channels, downsample)
        self.to_embed = nn.Conv2d(channels, embed_dim, 1)
        self.quantize = _quantizer(embed_dim, quant or {})
        self.decoder = Decoder(embed_dim, 3, channels, res_blocks, res_channels, downsample)

    def encode_latents(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bottom": self.to_embed(self.encoder(images * 2 - 1))}

    def decode(self, quantized: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(quantized["bottom"]) * 0.5 + 0.5


class VQVAE2(nn.Module):
    """Top grid at 1/(2*downsample), bottom grid at 1/downsample; bottom quantizer sees the decoded top codes.

    `top_encoder_channels`: the top encoder's width after its strided conv (0: `channels`, this model's
    original layout; channels // 2 is rosinality's).
    """

    levels = ("top", "bottom")

    def __init__(
        self,
        channels: int = 128,
        res_blocks: int = 2,
        res_channels: int = 32,
        embed_dim: int = 64,
        downsample: int = 4,
        quant: dict | None = None,
        top_encoder_channels: int = 0,
    ):
        super().__init__()
        quant = quant or {}
        self.downsample = downsample
        self.encoder_bottom = Encoder(3, channels, res_blocks, res_channels, downsample)
        self.encoder_top = Encoder(channels, channels, res_blocks, res_channels, 2, top_encoder_channels)
        self.to_embed_top = nn.Conv2d(channels, embed_dim, 1)
        self.quantize_top = _quantizer(embed_dim, quant)
        self.decoder_top = Decoder(embed_dim, embed_dim, channels, res_blocks, res_channels, 2)
        self.to_embed_bottom = nn.Conv2d(embed_dim + channels, embed_dim, 1)
        self.quantize_bottom = _quantizer(embed_dim, quant)
        self.upsample_top = nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1)
        self.decoder = Decoder(2 * embed_dim, 3, channels, res_blocks, res_channels, downsample)

    def grid_shapes(self, resolution: int) -> dict[str, tuple[int, int]]:
        bottom = resolution // self.downsample
        return {"top": (bottom // 2, bottom // 2), "bottom": (bottom, bottom)}

    def quantizers(self) -> dict[str, VectorQuantizer]:
        return {"top": self.quantize_top, "bottom": self.quantize_bottom}

    def encode_latents(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-quantisation latent per level, {level: [B, D, h, w]}: what each quantizer sees.

        The bottom latent is made from the quantized top, so this runs the top quantizer: in
        training mode that updates its codebook, so call it in eval mode.
        """
        return self._encode(images)[0]

    def encode(self, images: torch.Tensor):
        """-> (quantized maps per level, code indices per level, quantizer loss, stats per level)."""
        return self._encode(images)[1:]

    def _encode(self, images: torch.Tensor):
        features_bottom = self.encoder_bottom(images * 2 - 1)
        latent_top = self.to_embed_top(self.encoder_top(features_bottom))
        quantized_top, indices_top, loss_top, stats_top = self.quantize_top(latent_top)
        latent_bottom = self.to_embed_bottom(torch.cat([self.decoder_top(quantized_top), features_bottom], dim=1))
        quantized_bottom, indices_bottom, loss_bottom, stats_bottom = self.quantize_bottom(latent_bottom)
        return (
            {"top": latent_top, "bottom": latent_bottom},
            {"top": quantized_top, "bottom": quantized_bottom},
            {"top": indices_top, "bottom": indices_bottom},
            loss_top + loss_bottom,
            {"top": stats_top, "bottom": stats_bottom},
        )

    def decode(self, quantized: dict[str, torch.Tensor]) -> torch.Tensor:
        joined = torch.cat([self.upsample_top(quantized["top"]), quantized["bottom"]], dim=1)
        return self.decoder(joined) * 0.5 + 0.5

    def decode_codes(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decode(
            {"top": self.quantize_top.lookup(codes["top"]), "bottom": self.quantize_bottom.lookup(codes["bottom"])}
        )

    def forward(self, images: torch.Tensor):
        quantized, indices, loss, stats = self.encode(images)
        return self.decode(quantized), indices, loss, stats
