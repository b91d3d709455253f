"""IntroVAE's networks (Huang et al. 2018): the VAE of the AE-vs-VAE study, split in two modules.

Two modules because IntroVAE trains the encoder and the decoder with separate optimizers (the encoder
doubles as the discriminator). Their layers are `models/autoencoder.py`'s, not the paper's residual
blocks, so the baseline differs from the VAE it is compared with only in how it is trained.
"""

from __future__ import annotations

import torch
from torch import nn

from facegen_dist.models.autoencoder import _down, _up


def _bottom_shape(resolution: int, channels: list[int]) -> tuple[int, int, int]:
    bottom = resolution // 2 ** len(channels)
    if bottom < 1 or resolution % 2 ** len(channels):
        raise ValueError(
            f"resolution {resolution} is not divisible by 2**{len(channels)} (one halving per channel entry)"
        )
    return channels[-1], bottom, bottom


class IntroEncoder(nn.Module):
    def __init__(self, resolution: int, channels: list[int], latent_dim: int):
        super().__init__()
        depth, height, width = _bottom_shape(resolution, channels)
        widths = [3, *channels]
        self.features = nn.Sequential(*[_down(a, b) for a, b in zip(widths[:-1], widths[1:])], nn.Flatten())
        self.to_mean = nn.Linear(depth * height * width, latent_dim)
        self.to_logvar = nn.Linear(depth * height * width, latent_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (mean, log-variance) of q(z|x)."""
        features = self.features(images)
        return self.to_mean(features), self.to_logvar(features)


class IntroDecoder(nn.Module):
    def __init__(self, resolution: int, channels: list[int], latent_dim: int):
        super().__init__()
        self.bottom_shape = _bottom_shape(resolution, channels)
        self.latent_dim = latent_dim
        self.from_latent = nn.Linear(latent_dim, self.bottom_shape[0] * self.bottom_shape[1] * self.bottom_shape[2])
        up_widths = list(reversed(channels))
        self.net = nn.Sequential(
            *[_up(a, b) for a, b in zip(up_widths[:-1], up_widths[1:])],
            nn.ConvTranspose2d(up_widths[-1], 3, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(self.from_latent(latents).view(-1, *self.bottom_shape))


class IntroVAEPair(nn.Module):
    """Encoder + decoder seen as one VAE (encode/decode), for reconstructions and the latent tools."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim = decoder.latent_dim

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)
