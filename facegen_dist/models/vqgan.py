"""VQ-GAN autoencoder (Esser et al. 2021), after taming-transformers.

Encoder and decoder follow CompVis/taming-transformers (`taming/modules/diffusionmodules/model.py`,
`taming/models/vqgan.py`) with taming's module names, so its state dicts map onto this one apart from the
quantizer. Design notes (what is changed from taming, and why): docs/vqgan.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.models.quantizer import VectorQuantizer
from facegen_dist.models.vqvae import OneGridVQ


def group_count(channels: int, most: int = 32) -> int:
    """Largest number of groups <= `most` that divides `channels`."""
    return next(groups for groups in range(min(most, channels), 0, -1) if channels % groups == 0)


def Normalize(channels: int) -> nn.GroupNorm:
    # taming: always 32 groups; the largest divisor <= 32 lets tiny test widths build (taming's norm when 32 divides).
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (
            conv(h).reshape(batch, 1, channels, height * width).transpose(2, 3) for conv in (self.q, self.k, self.v)
        )
        # taming's bmm + softmax maths (scale C^-1/2); fused GPU kernels never hold the HW x HW matrix
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        h = h.transpose(2, 3).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding: exactly half the size


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Blocks(nn.Module):
    """The middle blocks shared by the encoder and the decoder."""

    def _middle(self, h: torch.Tensor) -> torch.Tensor:
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = block(h)
        return h

    def _middle_blocks(self, channels: int, dropout: float) -> nn.Module:
        mid = nn.Module()
        mid.block_1 = ResnetBlock(channels, channels, dropout)
        mid.attn_1 = AttnBlock(channels)
        mid.block_2 = ResnetBlock(channels, channels, dropout)
        return mid


class Encoder(_Blocks):
    """Image [B, 3, H, W] in [-1, 1] -> latent [B, z_channels, H/f, W/f], f = 2**(len(ch_mult)-1)."""

    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        current, widths = resolution, (1, *ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * widths[level], ch * mult
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                current //= 2
            self.down.append(down)
        self.mid = self._middle_blocks(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for index, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[index](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self._middle(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(_Blocks):
    """Latent [B, z_channels, h, w] -> image [B, 3, h*f, w*f] in about [-1, 1] (not clamped)."""

    def __init__(
        self,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        out_channels: int = 3,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        current = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = self._middle_blocks(block_in, dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                current *= 2
            self.up.insert(0, up)  # self.up[level] is the stage at that level, as in taming
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._middle(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for index, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[index](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQGAN(OneGridVQ):
    """Taming's VQ autoencoder with our quantizer: one code grid ("bottom") at 1/f of the image.

    `attn_resolutions` are feature-map sides (at the construction `resolution`) that get attention
    blocks; the middle blocks always have one. Same interface as `VQVAE`.
    """

    def __init__(
        self,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        resolution: int = 256,
        embed_dim: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
        quant: dict | None = None,
    ):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.downsample = 2 ** (len(ch_mult) - 1)
        shape = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            z_channels=z_channels,
            dropout=dropout,
        )
        self.encoder = Encoder(**shape)
        self.decoder = Decoder(**shape)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(dim=embed_dim, **(quant or {}))
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode_latents(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-quantisation latent per level, {level: [B, D, h, w]}: what the quantizer sees."""
        return {"bottom": self.quant_conv(self.encoder(images * 2 - 1))}

    def decode(self, quantized: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized["bottom"])) * 0.5 + 0.5
