"""Checks that ranks agree."""

from __future__ import annotations

import torch

from facegen_dist.train.strategy import full_parameters


@torch.no_grad()
def parameter_checksums(accelerator, modules: dict[str, torch.nn.Module]) -> list[float]:
    """One float64 checksum of all parameters per rank (index = rank); equal when DDP is in sync."""
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for name in sorted(modules):
        with full_parameters(accelerator, modules[name]):
            for param in accelerator.unwrap_model(modules[name]).parameters():
                # Weighted by position so that swapped values change the sum.
                flat = param.detach().double().flatten()
                total += (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)).sum()
    return [float(v) for v in accelerator.gather(total.reshape(1)).cpu()]
