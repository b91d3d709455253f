"""A small CNN that classifies avatar attributes; its pooled features are the avatar FD's feature space.

Sized to train in minutes on 2 CPU cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _stage(in_channels: int, out_channels: int, second_conv: bool) -> nn.Sequential:
    layers = _conv(in_channels, out_channels, 2)
    if second_conv:
        layers += _conv(out_channels, out_channels, 1)
    return nn.Sequential(*layers)


class AttributeNet(nn.Module):
    """Input: uint8 images of any size, resized (antialiased) to `input_size`. Four stages, each halving the
    resolution with a strided 3x3 conv (BN, ReLU) followed, after the first stage, by a second 3x3 conv; then
    global average pooling to a `channels[-1]`-d feature and one linear head per attribute."""

    def __init__(
        self, head_sizes: dict[str, int], channels: tuple[int, ...] = (32, 64, 128, 192), input_size: int = 64
    ):
        super().__init__()
        self.input_size = input_size
        widths = (3, *channels)
        self.trunk = nn.Sequential(
            *[_stage(a, b, second_conv=index > 0) for index, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
        )
        self.feature_dim = channels[-1]
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, size) for name, size in head_sizes.items()})

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        # channels_last: oneDNN's fast path on CPU (~1.5x here), and what tensor cores want on GPU.
        return ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(images_uint8)).mean(dim=(2, 3))

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.features(images_uint8)
        return features, {name: head(features) for name, head in self.heads.items()}
