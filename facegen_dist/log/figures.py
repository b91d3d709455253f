"""Small matplotlib figures for the run folder and the dashboards."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from facegen_dist.models.quantizer import perplexity


def codebook_usage_figure(usage: dict[str, torch.Tensor], path: Path) -> None:
    """One panel per code level: codes sorted by how often they are picked (log scale), with perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(usage), figsize=(5 * len(usage), 3.2), squeeze=False)
    for axis, (level, counts) in zip(axes[0], usage.items()):
        counts = counts.float().cpu()
        share = counts / counts.sum().clamp(min=1e-12)
        ordered = share.sort(descending=True).values.numpy()
        axis.bar(range(len(ordered)), ordered + 1e-7, width=1.0, color="tab:blue")
        axis.set_yscale("log")
        axis.set_xlabel("code (sorted by use)")
        axis.set_ylabel("share of picks (EMA)")
        used = (share > 1e-4).float().mean().item()
        # Two lines: on one, the title runs past a 5-inch panel and loses the "used" figure.
        axis.set_title(
            f"{level}: {len(ordered)} codes, used {used:.0%}\nperplexity of EMA usage {perplexity(counts).item():.0f}",
            fontsize=10,
        )
    figure.tight_layout()
    tmp = f"{path}.tmp.png"
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    os.replace(tmp, path)
