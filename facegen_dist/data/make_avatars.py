"""`facegen data avatars`: render the embedded avatar set into train/val WebDataset shards."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from functools import partial
from pathlib import Path

from facegen_dist import __version__
from facegen_dist.data.avatars import attribute_vocabulary, render_avatar
from facegen_dist.data.shards import MANIFEST_NAME, ShardWriter, write_manifest
from facegen_dist.errors import DataError
from facegen_dist.log.progress import progress_bar


def _render(index: int, seed: int, size: int) -> tuple[int, bytes, bytes]:
    png, attributes = render_avatar(seed, index, size)
    return index, png, json.dumps(attributes, sort_keys=True).encode()


def split_counts(num: int, val_fraction: float) -> tuple[int, int]:
    num_val = max(1, round(num * val_fraction)) if num > 1 else 0
    return num - num_val, num_val


def make_avatar_dataset(
    out_dir: str | os.PathLike,
    num: int,
    size: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    samples_per_shard: int = 1000,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Render `num` avatars of `size` px into `out_dir`; returns the manifest.

    Image i is a pure function of (seed, i), shards and manifest are written to a temporary
    folder and renamed into place, so the result is byte-identical for a seed and a folder
    with a manifest is always complete.
    """
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists():
        raise DataError(f"{out_dir}: already holds a dataset (manifest.json); choose another --out or delete it")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: exists and is not empty; choose another --out")
    if num < 2 or size < 8 or samples_per_shard < 1:
        raise DataError(f"need --num >= 2, --size >= 8 and shard size >= 1 (got {num}, {size}, {samples_per_shard})")
    num_train, num_val = split_counts(num, val_fraction)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    writers = {
        "train": ShardWriter(tmp_dir, "train", samples_per_shard),
        "val": ShardWriter(tmp_dir, "val", samples_per_shard),
    }
    workers = workers or os.cpu_count() or 1
    render = partial(_render, seed=seed, size=size)
    try:
        # imap keeps index order, so the tars do not depend on which worker was fastest.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.imap(render, range(num), chunksize=32)
            for index, png, attributes in progress_bar(
                results, total=num, desc=f"rendering {num} avatars at {size}px", unit="img", disable=not progress
            ):
                split = "train" if index < num_train else "val"
                writers[split].write(f"{index:08d}", {"png": png, "json": attributes})
        for writer in writers.values():
            writer.close()
        manifest = {
            "name": "avatars",
            "tool": f"facegen-dist {__version__}",
            "seed": seed,
            "image_size": size,
            "image_format": "png",
            "num_samples": num,
            "splits": {
                split: {"num_samples": sum(s["num_samples"] for s in w.shards), "shards": w.shards}
                for split, w in writers.items()
            },
            "attributes": attribute_vocabulary(),
        }
        write_manifest(tmp_dir, manifest)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def ensure_embedded_avatars(
    cache_dir: str | os.PathLike, num: int, size: int, seed: int, progress: bool = True
) -> Path:
    """The cached embedded set for (num, size, seed), rendered if it is not there yet."""
    path = Path(cache_dir) / f"avatars-{size}px-{num}-seed{seed}"
    if (path / MANIFEST_NAME).is_file():
        return path
    try:
        make_avatar_dataset(path, num=num, size=size, seed=seed, progress=progress)
    except DataError:
        # Another node sharing this folder finished first: its copy is identical.
        if not (path / MANIFEST_NAME).is_file():
            raise
    except OSError:
        if not (path / MANIFEST_NAME).is_file():
            raise
    return path
