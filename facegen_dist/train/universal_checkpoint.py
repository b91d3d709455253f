"""Resuming a DeepSpeed checkpoint on another number of processes, through DeepSpeed's universal checkpoint.

ZeRO partitions the fp32 master weights and Adam moments per rank. DeepSpeed's own
`ds_to_universal` merges them into one file per parameter (fp32, exp_avg, exp_avg_sq, step), and
its engine re-partitions those for the new world size when `load_universal_checkpoint` is on.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

# accelerate's save_state writes engine i's files into <checkpoint>/pytorch_model[_i]/
ENGINE_FOLDER = "pytorch_model"


def convert(folder: Path, out: Path) -> str | None:
    """`folder`'s engine files as a universal checkpoint in `out/pytorch_model` (run on one rank); why not, or None."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # A subprocess: the converter starts worker pools of its own, which must not inherit the process group.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(folder / ENGINE_FOLDER),
            "--output_folder",
            str(out / ENGINE_FOLDER),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return None
    shutil.rmtree(out, ignore_errors=True)
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {result.returncode}"


@contextlib.contextmanager
def loading_from(accelerator, universal: Path):
    """Inside: accelerate's load_state reads the engines' state from `universal` (re-partitioned), the rest from the checkpoint."""
    engines = [
        model for model in accelerator._models if hasattr(model, "load_checkpoint") and hasattr(model, "_config")
    ]
    for engine in engines:
        original = engine.load_checkpoint
        engine._config.load_universal_checkpoint = True
        engine.load_checkpoint = lambda load_dir, tag=None, _original=original, **kwargs: _original(
            str(universal), tag, **kwargs
        )
    try:
        yield
    finally:
        for engine in engines:
            del engine.load_checkpoint  # the instance attribute; the class's method again
            engine._config.load_universal_checkpoint = False
