"""Timing shared by the benchmark scripts (run as `python benchmarks/X.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def best_of(call: Callable[[], T], device: torch.device, repeats: int) -> tuple[float, T]:
    """The fastest of `repeats` calls in seconds (on a shared machine the minimum is the least noisy), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result
