"""PatchGAN discriminator for the VQ-GAN, after taming-transformers.

Follows CompVis/taming-transformers' NLayerDiscriminator and ActNorm; layer indices inside `main` match
taming's, so its discriminator weights load as they are. Design notes (what is changed from taming, and
why): docs/vqgan.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def weights_init(module: nn.Module) -> None:
    """Taming's (DCGAN's) init: conv weights N(0, 0.02); batch-norm scale N(1, 0.02), bias 0."""
    name = module.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(module.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight.data, 1.0, 0.02)
        nn.init.constant_(module.bias.data, 0)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ActNorm(nn.Module):
    """Per-channel affine `scale * (x + loc)`, initialised so the first training batch has zero mean, unit std."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
        # Sums, not means, so ranks with any batch size pool exactly; float64 so sum-of-squares keeps the variance.
        sums = torch.stack([flat.sum(1), flat.pow(2).sum(1)])
        count = torch.tensor([float(flat.shape[1])], dtype=torch.float64, device=x.device)
        packed = torch.cat([sums.flatten(), count])
        # Pooled over ranks (taming: the local batch): DDP broadcast the parameters before this init, so
        # only the pooled statistics start every rank from the same D.
        if _world() > 1:
            dist.all_reduce(packed)
        total, total_sq, n = packed[: flat.shape[0]], packed[flat.shape[0] : -1], packed[-1]
        mean = total / n
        # unbiased, like taming's tensor.std
        std = ((total_sq - n * mean.pow(2)) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
        self.loc.data.copy_(-mean.view_as(self.loc).to(self.loc.dtype))
        self.scale.data.copy_((1 / (std + 1e-6)).view_as(self.scale).to(self.scale.dtype))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        return self.scale * (x + self.loc)


class PatchDiscriminator(nn.Module):
    """Images [B, C, H, W] in [0, 1] -> real/fake logits per patch [B, 1, H', W'] (H' = H/2**n_layers - 2)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        norms = {"batch": nn.BatchNorm2d, "act": ActNorm, "none": lambda channels: nn.Identity()}
        if norm not in norms:
            raise ValueError(f"discriminator norm '{norm}' is not one of {', '.join(norms)}")
        norm_layer, use_bias = norms[norm], norm != "batch"  # BatchNorm has its own shift
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last feature layer keeps the resolution
            layers += [
                nn.Conv2d(ndf * previous, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """-> logits, or (logits, [activation after each LeakyReLU]) with `return_features`."""
        h, features = images * 2 - 1, []
        for layer in self.main:
            h = layer(h)
            if return_features and isinstance(layer, nn.LeakyReLU):
                features.append(h)
        return (h, features) if return_features else h
