"""DCGAN (Radford et al. 2016): a transposed-conv generator from a latent vector and its mirror discriminator.

Widths double as the maps halve, capped at `max_channels`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _widths(resolution: int, channels: int, max_channels: int) -> list[int]:
    """Channel widths from the 4x4 map (first) to the map just below full resolution (last)."""
    doublings = int(math.log2(resolution)) - 2
    if resolution < 8 or 2 ** (doublings + 2) != resolution:
        raise ValueError(f"DCGAN needs a power-of-two resolution >= 8, got {resolution}")
    return [min(channels * 2 ** (doublings - 1 - i), max_channels) for i in range(doublings)]


def dcgan_init(module: nn.Module) -> None:
    """Weights N(0, 0.02), BatchNorm scales N(1, 0.02): the paper's initialisation."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class DCGANGenerator(nn.Module):
    """z -> 4x4 (transposed conv 4x4), then one [transposed conv 4x4 stride 2 + BatchNorm + ReLU] per doubling
    up to the resolution, the last one to RGB with tanh (mapped to [0, 1], the range of every image here)."""

    def __init__(self, resolution: int, latent_dim: int = 100, channels: int = 64, max_channels: int = 512):
        super().__init__()
        widths = _widths(resolution, channels, max_channels)
        self.latent_dim = latent_dim
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent_dim] -> images [B, 3, R, R] in [0, 1]."""
        return self.net(latents[:, :, None, None]) * 0.5 + 0.5


class DCGANDiscriminator(nn.Module):
    """[conv 4x4 stride 2 + (BatchNorm) + LeakyReLU 0.2] down to 4x4, then a 4x4 conv to one logit."""

    def __init__(self, resolution: int, channels: int = 64, max_channels: int = 512, batch_norm: bool = True):
        super().__init__()
        widths = list(reversed(_widths(resolution, channels, max_channels)))
        # no norm on the input layer (the paper)
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 4, 2, 1),
            nn.LeakyReLU(0.2, True),
        ]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(b)] if batch_norm else []
            layers += [nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> one logit per image [B]."""
        return self.net(images * 2.0 - 1.0).flatten()
