"""One phase's optimizer step, as the training loop and the benchmarks run it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from facegen_dist.methods import Method, MicroBatch, Phase
from facegen_dist.train import strategy


@dataclass
class PhaseResult:
    stepped: bool  # False: a non-finite loss or gradient, and no rank stepped
    grad_norm: torch.Tensor
    stats: list[dict[str, torch.Tensor]]  # per micro-batch


def _untimed(_segment: str):
    return contextlib.nullcontext()


def run_phase(
    accelerator,
    method: Method,
    phase: Phase,
    modules: dict[str, torch.nn.Module],
    optimizer,
    micro_batches: list[MicroBatch],
    clip: float,
    poison: bool = False,
    timed: Callable[[str], contextlib.AbstractContextManager] = _untimed,
) -> PhaseResult:
    """Forward and backward over the micro-batches, then one clipped step; `poison` makes the loss NaN (tests),
    `timed(segment)` wraps forward, backward and optimizer (benchmarks)."""
    phase_modules = [modules[name] for name in phase.modules]
    strategy.clear_gradients(accelerator, modules)
    stats = []
    for index, batch in enumerate(micro_batches):
        with strategy.accumulating(accelerator, phase_modules, last=index == len(micro_batches) - 1):
            with timed("forward"), strategy.autocast(accelerator):
                loss, batch_stats = method.loss(phase.name, modules, batch)
            if poison:
                loss = loss * float("nan")
            with timed("backward"):
                strategy.backward(accelerator, loss, len(micro_batches))
        stats.append(batch_stats)
    with timed("optimizer"):
        params = [p for module in phase_modules for p in module.parameters()]
        stepped, grad_norm = strategy.clip_and_step(accelerator, optimizer, params, clip)
    return PhaseResult(stepped, grad_norm, stats)


def phase_clip(phase: Phase, cfg) -> float:
    """The phase's gradient clip where it sets one, else train.grad_clip (0: off)."""
    return phase.grad_clip if phase.grad_clip is not None else cfg.train.grad_clip
