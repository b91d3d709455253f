"""Code shards: a VQ run's codes of an image dataset, the data a PixelCNN prior trains on.

`facegen codes --run runs/vqvae2_avatars64 --out data/codes-vqvae2_avatars64` (also under `accelerate launch`):
every image shard becomes a code shard of the same name and keys, `KEY.<level>.npy` (int16 [h, w] per level) +
`KEY.json`. The manifest (kind `vq-codes`) names the VQ run and checkpoint and the image dataset they encode.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from facegen_dist.data.codecs import decode_image, encode_npy
from facegen_dist.data.resolve import resolve_data_dir
from facegen_dist.data.shards import (
    ShardWriter,
    file_sha256,
    image_extension,
    iter_shard_samples,
    read_manifest,
    write_manifest,
)
from facegen_dist.errors import DataError
from facegen_dist.log.progress import progress_bar
from facegen_dist.methods.base import VQ_METHODS
from facegen_dist.runs import restore_run

CODES_KIND = "vq-codes"


def is_code_dataset(manifest: dict) -> bool:
    return manifest.get("kind") == CODES_KIND


def image_dir(data_dir: str | os.PathLike) -> Path:
    """The folder of images behind `data_dir`: itself, or for a code dataset the images its codes encode."""
    manifest = read_manifest(data_dir)
    if not is_code_dataset(manifest):
        return Path(data_dir)
    source = Path(manifest["images"]["path"])
    if not (source / "manifest.json").is_file():
        raise DataError(
            f"{data_dir}: its codes encode the images at '{source}', which are gone (grids and evaluation need them)"
        )
    return source


@torch.no_grad()
def _encode_batch(vq, images: list[np.ndarray], device) -> dict[str, np.ndarray]:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device).float().div_(255.0)
    _, indices, _, _ = vq.encode(batch)
    return {level: codes.to(torch.int16).cpu().numpy() for level, codes in indices.items()}


def _encode_shard(vq, source: str, writer: ShardWriter, resolution: int, batch_size: int, device) -> int:
    """Encode one image shard into `writer`; returns the number of unreadable samples skipped."""
    skipped, pending = 0, []

    def flush():
        codes = _encode_batch(vq, [image for _, image, _ in pending], device)
        for index, (key, _, attributes) in enumerate(pending):
            files = {f"{level}.npy": encode_npy(grid[index]) for level, grid in codes.items()}
            if attributes is not None:
                files["json"] = attributes
            writer.write(key, files)
        pending.clear()

    for sample in iter_shard_samples(source):
        extension = image_extension(sample)
        try:
            image = decode_image(sample[extension], resolution) if extension else None
        except Exception:  # noqa: BLE001 — PIL raises many types for damaged images
            image = None
        if image is None:
            skipped += 1
            continue
        pending.append((sample["__key__"], image, sample.get("json")))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return skipped


def extract_codes(accelerator, restored, out_dir: str | os.PathLike, batch_size: int, images: Path) -> dict:
    """Encode every split of `images` with the restored VQ run into code shards at `out_dir`; every rank calls it."""
    from accelerate.utils import gather_object

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not an empty folder; choose another --out or delete it")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    source = read_manifest(images)
    vq, resolution = restored.modules["vqvae"], restored.cfg.data.resolution
    # Shard i goes to process i mod P and is encoded in batches that start at its first sample, so the
    # code shards are byte-identical for any process count.
    mine = [
        (split, entry)
        for split, info in source["splits"].items()
        for index, entry in enumerate(info["shards"])
        if index % accelerator.num_processes == accelerator.process_index
    ]
    written, skipped = [], 0
    for split, entry in progress_bar(
        mine, desc="encoding shards", unit="shard", disable=not accelerator.is_main_process
    ):
        writer = ShardWriter(tmp, split, samples_per_shard=1 << 30)
        writer.start(entry["file"])  # one code shard per image shard, same name
        skipped += _encode_shard(
            vq, str(Path(images) / entry["file"]), writer, resolution, batch_size, accelerator.device
        )
        writer.close()
        written.append((split, writer.shards[-1]))
    everyone = gather_object([(written, skipped)])
    manifest = {}
    if accelerator.is_main_process:
        splits: dict[str, list[dict]] = {}
        for rank_written, _ in everyone:
            for split, entry in rank_written:
                splits.setdefault(split, []).append(entry)
        grids = vq.grid_shapes(resolution)
        manifest = {
            "kind": CODES_KIND,
            "name": f"codes of {restored.cfg.run.name}",
            "levels": {level: list(shape) for level, shape in grids.items()},
            "num_codes": int(restored.cfg.model.num_codes),
            "vq_run": str(restored.run_dir.resolve()),
            "vq_checkpoint": restored.checkpoint.name,
            "vq_ema": restored.ema,
            "images": {
                "path": str(Path(images).resolve()),
                "manifest_sha256": file_sha256(Path(images) / "manifest.json"),
                "resolution": resolution,
            },
            "skipped_unreadable": sum(count for _, count in everyone),
            "splits": {
                split: {
                    "num_samples": sum(e["num_samples"] for e in entries),
                    "shards": sorted(entries, key=lambda e: e["file"]),
                }
                for split, entries in splits.items()
            },
        }
        write_manifest(tmp, manifest)
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()
    return manifest


def encode_run(run: str, out: str, checkpoint_name: str = "", batch_size: int = 64, use_ema: bool = True):
    """Encode the images of VQ run folder `run` into code shards at `out`; every process calls it.

    Returns (the restored run, the manifest) on the main process, None on the others.
    """
    from facegen_dist.accelerator import make_accelerator

    accelerator = make_accelerator()
    try:
        restored = restore_run(run, device=accelerator.device, use_ema=use_ema, checkpoint_name=checkpoint_name)
        if restored.cfg.model.name not in VQ_METHODS:
            raise DataError(
                f"--run {run}: a '{restored.cfg.model.name}' run has no codes ({'/'.join(VQ_METHODS)} runs do)"
            )
        images = image_dir(resolve_data_dir(restored.cfg.data, accelerator))
        manifest = extract_codes(accelerator, restored, out, batch_size, images)
        return (restored, manifest) if accelerator.is_main_process else None
    finally:
        accelerator.end_training()
