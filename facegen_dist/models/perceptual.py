"""LPIPS-form perceptual distances for the VQ-GAN (taming's `lpips.py`: Zhang et al. 2018), frozen, plain torch.

Channel-normalised features at several depths, squared difference, spatial mean, sum over depths. The
networks come in built and loaded: facegen_dist.weights finds and reads their weight files, so nothing
here reads a file. Inputs are images in [0, 1] (scaled to [-1, 1] inside); the loss is per image, [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyLPIPS(nn.Module):
    """Plumbing-only stand-in: LPIPS formula over a fixed random conv net. Inputs in [-1, 1].

    It runs in milliseconds for tests and CPU smoke configs and means nothing about image quality.
    """

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), seed: int = 0):
        super().__init__()
        generator, stages, in_channels = torch.Generator().manual_seed(seed), [], 3
        for index, width in enumerate(widths):
            conv = nn.Conv2d(in_channels, width, 3, stride=1 if index == 0 else 2, padding=1)
            # Own generator: the same net whatever the global RNG state.
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * (2 / (in_channels * 9)) ** 0.5
            conv.bias.data.zero_()
            stages.append(nn.Sequential(conv, nn.ReLU()))
            in_channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lpips_distance(self.stages, images, targets)


def lpips_distance(stages, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LPIPS with unit heads over the outputs of `stages` (applied in turn): per image [B]."""
    total = images.new_zeros(images.shape[0])
    for stage in stages:
        images, targets = stage(images), stage(targets)
        # F.normalize: unlike x / sqrt(sum x^2) it has a gradient where ReLU zeroed every channel.
        difference = (F.normalize(images, dim=1, eps=1e-10) - F.normalize(targets, dim=1, eps=1e-10)).pow(2)
        total = total + difference.sum(1).mean((1, 2))  # unit heads, spatial mean
    return total


class AvatarLPIPS(nn.Module):
    """LPIPS form over the four stages of an avatar attribute network (models.attribute_net), unit heads.

    With the shipped avatar-v1 weights, a real, trained feature space for cartoon avatars that needs no
    download: the perceptual loss of the CPU avatar configs, where VGG16 weights are not to be had offline.
    Caveat: the avatar FD (`fd_avatar`, `rfd_avatar`) measures in the same feature space, so a model trained
    with this loss is favoured by that metric; judge it by PSNR/SSIM and by eye too. Inputs in [-1, 1].
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.input_size = net.input_size
        self.stages = net.trunk

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size:
            images, targets = (
                F.interpolate(
                    x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
                )
                for x in (images, targets)
            )
        return lpips_distance(self.stages, images, targets)


class PerceptualLoss(nn.Module):
    """Frozen perceptual distance between images in [0, 1]; returns one value per image, shape [B].

    net: a distance over images in [-1, 1] (the `lpips` package's LPIPS, AvatarLPIPS or TinyLPIPS);
    backbone: its name, for the repr. The module stays in eval mode whatever its parent's mode (dropout
    in the heads stays off). Hold it as a plain attribute of the Method, not in the modules dict the loop
    prepares, checkpoints and optimizes: it has no trainable parameters and its weights are rebuilt from
    files, so a checkpoint needs none of its 58 MB (VGG16 trunk).
    """

    def __init__(self, net: nn.Module, backbone: str):
        super().__init__()
        self.net = net
        self.backbone = backbone
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always eval: a parent's .train() must not switch the heads' dropout on

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1, targets * 2 - 1).reshape(images.shape[0])

    def extra_repr(self) -> str:
        return f"backbone={self.backbone}"
