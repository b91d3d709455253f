"""Learning-rate schedule as a pure function of images seen.

Stateless on purpose: accelerate's prepared scheduler steps `num_processes` times per optimizer step and skips
on fp16 overflow, so its state depends on the launch. A function of images seen gives the same LR for the same
point in training on any number of GPUs, and nothing to checkpoint.
"""

from __future__ import annotations

import math


def lr_factor(images_seen: int, total_images: int, warmup_images: int, schedule: str, min_ratio: float) -> float:
    if warmup_images > 0 and images_seen < warmup_images:
        return (images_seen + 1) / warmup_images
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (images_seen - warmup_images) / max(1, total_images - warmup_images))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
