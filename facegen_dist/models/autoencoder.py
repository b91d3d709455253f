"""AE and VAE of the slides and dissertation: a conv encoder to a dense latent, and its mirror.

Encoder: len(channels) x [conv 4x4 stride 2 + BatchNorm + LeakyReLU], flatten, dense to the
latent (the VAE has two heads: mean and log-variance). Decoder: dense, reshape, transposed
convs back up, sigmoid. Images are in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ConvAutoencoder(nn.Module):
    def __init__(self, resolution: int, channels: list[int], latent_dim: int, variational: bool):
        super().__init__()
        bottom = resolution // 2 ** len(channels)
        if bottom < 1 or resolution % 2 ** len(channels):
            raise ValueError(
                f"resolution {resolution} is not divisible by 2**{len(channels)} (one halving per channel entry)"
            )
        self.variational = variational
        self.bottom_shape = (channels[-1], bottom, bottom)
        flat = channels[-1] * bottom * bottom
        widths = [3, *channels]
        self.encoder = nn.Sequential(*[_down(a, b) for a, b in zip(widths[:-1], widths[1:])], nn.Flatten())
        self.to_mean = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim) if variational else None
        self.from_latent = nn.Linear(latent_dim, flat)
        up_widths = list(reversed(channels))
        self.decoder = nn.Sequential(
            *[_up(a, b) for a, b in zip(up_widths[:-1], up_widths[1:])],
            nn.ConvTranspose2d(up_widths[-1], 3, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )
        self.latent_dim = latent_dim

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, log-variance) for a VAE, (code, None) for an AE."""
        features = self.encoder(images)
        logvar = self.to_logvar(features) if self.to_logvar is not None else None
        return self.to_mean(features), logvar

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.from_latent(latents).view(-1, *self.bottom_shape))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(reconstruction, mean/code, log-variance or None); a VAE samples z by reparameterisation."""
        mean, logvar = self.encode(images)
        latents = mean
        if logvar is not None and self.training:
            latents = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return self.decode(latents), mean, logvar


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp(), dim=1)
