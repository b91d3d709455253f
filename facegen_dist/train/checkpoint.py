"""Atomic checkpoints that prove themselves: written to a temp folder, listed in a manifest, renamed into place.

How: `save_checkpoint`. On start, checkpoints are checked newest first against their manifest
(`facegen_dist.checkpoints`, the read side).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from facegen_dist.checkpoints import FORMAT, MANIFEST_FILE, PREFIX, STATE_FILE, ema_file, list_checkpoints
from facegen_dist.data.shards import file_sha256
from facegen_dist.errors import FacegenError
from facegen_dist.train.strategy import deepspeed_weights_for_inference


def checkpoint_name(images_seen: int) -> str:
    return f"{PREFIX}{images_seen:012d}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: Path, images_seen: int) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)}
    _write_json_synced(folder / MANIFEST_FILE, {"format": FORMAT, "images_seen": images_seen, "files": files})


def assert_finite(modules: dict[str, torch.nn.Module]) -> None:
    for name, module in modules.items():
        for param_name, param in module.named_parameters():
            if not torch.isfinite(param).all():
                raise FacegenError(f"refusing to checkpoint: {name}.{param_name} holds NaN/inf")


def save_ema(folder: Path, emas: dict) -> None:
    """Not accelerate's pickled custom state: reading a run folder must never run code."""
    for name, ema in emas.items():
        # clone: safetensors refuses tensors that share storage; the EMA's own counters are tensors too
        save_file(
            {key: value.detach().cpu().clone().contiguous() for key, value in ema.state_dict().items()},
            str(folder / ema_file(name)),
        )


def _write_json_synced(path: Path, payload: dict) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(folder: Path) -> None:
    """Rename first (atomic), then delete: a deletion cut short leaves a `.del-` folder, never a `ckpt-` one."""
    doomed = folder.with_name(f".del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _no_space(error: BaseException) -> bool:
    text = str(error)
    markers = ("No space left", "os error 28", "unexpected pos", "iostream error")
    return getattr(error, "errno", None) == errno.ENOSPC or any(marker in text for marker in markers)


def rank_file(name: str, rank: int) -> str:
    return f"{name}_{rank}.json"


def share_readably(folder: Path) -> None:
    """Files as the umask allows (0644 usually): safetensors writes 0600, which a group on a shared cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_uid == os.getuid():  # another rank's user's files stay as they are
            path.chmod(0o666 & ~umask)


def save_checkpoint(
    accelerator,
    root: Path,
    trainer_state: dict,
    keep: int,
    modules: dict[str, torch.nn.Module],
    emas: dict,
    per_rank: dict[str, dict] | None = None,
) -> Path:
    """Write a checkpoint for `trainer_state['images_seen']`; every rank must call this. `per_rank`: JSON files each rank writes.

    `accelerator.save_state` writes modules, optimizers, grad scaler and each rank's RNG states (DDP and
    DeepSpeed alike) into `.tmp-ckpt-N/`. Rank 0 adds the EMA weights as `ema_<module>.safetensors`, full
    weights under DeepSpeed, `trainer_state.json`, and last `manifest.json` (every file's size and sha256),
    then renames the folder to `ckpt-N/`; old ones are renamed away before they are deleted.
    """
    assert_finite(modules)
    name = checkpoint_name(trainer_state["images_seen"])
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        for name, payload in (per_rank or {}).items():
            _write_json_synced(tmp / rank_file(name, accelerator.process_index), payload)
        full_weights = deepspeed_weights_for_inference(accelerator, modules)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # DeepSpeed's save_state writes its own engine files; add the model.safetensors files a DDP
            # checkpoint has, so that sampling, evaluation and code extraction read every run alike.
            for index, weights in enumerate(full_weights or []):
                save_file(
                    {k: v.contiguous() for k, v in weights.items()},
                    str(tmp / f"model{'' if index == 0 else f'_{index}'}.safetensors"),
                )
            save_ema(tmp, emas)
            _write_json_synced(tmp / STATE_FILE, {**trainer_state, "checkpoint_format": FORMAT})
            share_readably(tmp)
            write_manifest(tmp, trainer_state["images_seen"])
    except Exception as error:  # noqa: BLE001 — torch, safetensors and json each report a full disk their own way
        if _no_space(error):
            shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(root)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise FacegenError(
                f"no space left on {root} while writing {name}; {kept}: free space and rerun the same command"
            ) from None
        raise
    if accelerator.is_main_process:
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final
