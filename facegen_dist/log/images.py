"""Picture grids saved as PNG."""

from __future__ import annotations

import math
import os

import torch
from torchvision.utils import save_image


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Images in [0, 1], [N, 3, H, W] -> one PNG; written to a temp name then renamed."""
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    tmp = f"{path}.tmp.png"
    save_image(images.detach().float().clamp(0, 1).cpu(), tmp, nrow=nrow, padding=2, pad_value=1.0)
    os.replace(tmp, path)


def interleave_rows(top: torch.Tensor, bottom: torch.Tensor, per_row: int) -> torch.Tensor:
    """Rows of `top` each followed by the matching row of `bottom` (inputs over reconstructions)."""
    rows = []
    for start in range(0, top.shape[0], per_row):
        rows += [top[start : start + per_row], bottom[start : start + per_row]]
    return torch.cat(rows)
