"""Checks a checkpoint must pass before a run resumes from it: the same model shape, finite weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


def changed_shapes(
    modules: dict[str, torch.nn.Module], folder: Path, unwrap: Callable = lambda m: m, limit: int = 6
) -> str:
    """'' when every module's state dict matches its model*.safetensors in keys and shapes, else the differing keys."""
    differences = []
    for index, (name, module) in enumerate(modules.items()):
        path = folder / f"model{'' if index == 0 else f'_{index}'}.safetensors"
        if not path.is_file():
            continue  # a missing file is damage, reported by the manifest check or the load
        try:
            with safe_open(str(path), framework="pt") as saved:
                stored = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
        except Exception:  # noqa: BLE001 — an unreadable header is damage, not a shape change: the load reports it
            continue
        current = {key: tuple(value.shape) for key, value in unwrap(module).state_dict().items()}
        for key in sorted(set(stored) | set(current)):
            if key not in current:
                differences.append(f"{name}.{key} only in the checkpoint")
            elif key not in stored:
                differences.append(f"{name}.{key} not in the checkpoint")
            elif stored[key] != current[key]:
                differences.append(f"{name}.{key} {list(stored[key])} -> {list(current[key])}")
    more = f", and {len(differences) - limit} more" if len(differences) > limit else ""
    return ", ".join(differences[:limit]) + more


def non_finite_parameter(modules: dict[str, torch.nn.Module]) -> str | None:
    """'name.param holds NaN/inf' for the first such parameter or buffer, else None."""
    for name, module in modules.items():
        for tensor_name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return f"{name}.{tensor_name} holds NaN/inf"
    return None
