"""Atomic checkpoints: accelerate writes into a temp folder, rank 0 renames it into place.

`accelerator.save_state` writes modules, optimizers, grad scaler, registered objects (EMA)
and each rank's RNG states, and works for DDP and DeepSpeed alike, but it is not atomic.
Under DeepSpeed we add model*.safetensors (full weights) beside the engine's own files.
So it writes `.tmp-ckpt-N/`; when every rank is done, rank 0 adds `trainer_state.json`
(images seen, data position, counters) and renames the folder to `ckpt-N/`. Only folders
named `ckpt-*` with a trainer_state.json count: a crash at any moment leaves the previous
checkpoint as the newest valid one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from facegen_dist.errors import FacegenError
from facegen_dist.train.strategy import deepspeed_weights_for_inference

STATE_FILE = "trainer_state.json"
PREFIX = "ckpt-"


def checkpoint_name(images_seen: int) -> str:
    return f"{PREFIX}{images_seen:012d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Valid checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    for path in reversed(list_checkpoints(root)):
        try:
            json.loads((path / STATE_FILE).read_text())
            return path
        except (OSError, json.JSONDecodeError):
            continue
    return None


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_finite(modules: dict[str, torch.nn.Module]) -> None:
    for name, module in modules.items():
        for param_name, param in module.named_parameters():
            if not torch.isfinite(param).all():
                raise FacegenError(f"refusing to checkpoint: {name}.{param_name} holds NaN/inf")


def save_checkpoint(accelerator, root: Path, trainer_state: dict, keep: int, modules: dict[str, torch.nn.Module]) -> Path:
    """Write a checkpoint for `trainer_state['images_seen']`; every rank must call this."""
    assert_finite(modules)
    name = checkpoint_name(trainer_state["images_seen"])
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    full_weights = deepspeed_weights_for_inference(accelerator, modules)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # DeepSpeed's save_state writes its own engine files; add the model.safetensors files a DDP
        # checkpoint has, so that sampling, evaluation and code extraction read every run alike.
        for index, weights in enumerate(full_weights or []):
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / f"model{'' if index == 0 else f'_{index}'}.safetensors"))
        with open(tmp / STATE_FILE, "w") as handle:
            json.dump(trainer_state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
