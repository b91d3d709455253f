"""The checkpoint folder format, read side: folder names, trainer state, manifest checks, EMA weights.

train/checkpoint.py writes them (`save_checkpoint`'s docstring says how); the loop's resume, runs.py and the suite read
them here. Not in runs.py: the writer needs this part only, without the config and the method registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from facegen_dist.data.shards import file_sha256

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
PREFIX = "ckpt-"
FORMAT = 2  # 2: manifest + EMA safetensors; checkpoints without the key are the first format (no manifest)
REQUIRED_STATE = ("step", "images_seen", "batches_consumed")


def checkpoint_folders(root: Path) -> list[Path]:
    """Every `ckpt-*` folder, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def list_checkpoints(root: Path) -> list[Path]:
    """Folders that look complete (a trainer_state.json), oldest first; `checkpoint_problem` says whether they are sound."""
    return [p for p in checkpoint_folders(root) if (p / STATE_FILE).is_file()]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose state and file sizes match its manifest (readers: sampling, evaluation, suites)."""
    return next((p for p in reversed(list_checkpoints(root)) if checkpoint_problem(p, hashes=False) is None), None)


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _trainer_state_problem(folder: Path) -> tuple[dict | None, str | None]:
    try:
        state = read_trainer_state(folder)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{STATE_FILE} unreadable ({type(error).__name__})"
    if not isinstance(state, dict):
        return None, f"{STATE_FILE} is not a JSON object"
    missing = [key for key in REQUIRED_STATE if not isinstance(state.get(key), int) or state[key] < 0]
    if missing:
        return None, f"{STATE_FILE} lacks a valid {', '.join(missing)}"
    return state, None


def checkpoint_problem(folder: Path, hashes: bool = True) -> str | None:
    """Why `folder` is not a checkpoint to resume from, or None. `hashes=False` checks sizes only (cheap)."""
    state, problem = _trainer_state_problem(folder)
    if problem:
        return problem
    if state.get("checkpoint_format", 1) < FORMAT:
        return None  # first format: no manifest to check against; a load failure still rejects it
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        listed = manifest["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST_FILE} missing or unreadable"
    if manifest.get("images_seen") != state["images_seen"]:
        return f"{MANIFEST_FILE} is for {manifest.get('images_seen')} images, {STATE_FILE} for {state['images_seen']}"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if hashes and file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def ema_file(name: str) -> str:
    return f"ema_{name}.safetensors"


def load_ema_state(folder: Path, name: str, index: int) -> dict[str, torch.Tensor]:
    """The EMA state of module `name` (index: its place in ema_modules(), for first-format checkpoints)."""
    path = folder / ema_file(name)
    if path.is_file():
        return load_file(str(path))
    legacy = folder / f"custom_checkpoint_{index}.pkl"  # first format: accelerate's pickle of a tensor dict
    return torch.load(legacy, map_location="cpu", weights_only=True)
