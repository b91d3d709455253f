"""Reference features of real images, computed once per (dataset, split, resolution, extractor, N) and cached."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from facegen_dist.data.pipeline import iter_split_chunks
from facegen_dist.data.shards import MANIFEST_NAME, split_shards
from facegen_dist.eval.extractors import Extractor
from facegen_dist.eval.features import distributed_features, my_chunks
from facegen_dist.eval.metrics import feature_statistics


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_key(data_dir: Path, split: str, resolution: int, extractor: Extractor, num: int) -> dict:
    manifest_sha = file_digest(Path(data_dir) / MANIFEST_NAME)
    identity = f"{manifest_sha}|{split}|{resolution}|{extractor.name}|{extractor.weights_sha256}|{num}"
    return {
        "dataset_manifest_sha256": manifest_sha,
        "split": split,
        "resolution": resolution,
        "num_images": num,
        "extractor": extractor.name,
        "extractor_weights_sha256": extractor.weights_sha256,
        "key": hashlib.sha256(identity.encode()).hexdigest()[:24],
    }


def split_chunk_reader(data_dir: Path, split: str, num: int, batch_size: int, resolution: int, accelerator):
    """make_chunk(c, start, end) -> the real images of chunk c, read in one pass per rank."""
    chunks = my_chunks(num, batch_size, accelerator.process_index, accelerator.num_processes)
    stream = iter_split_chunks(split_shards(data_dir, split), num, batch_size, chunks, resolution)

    def make_chunk(chunk: int, start: int, end: int) -> torch.Tensor:
        got, images = next(stream)
        assert got == chunk, (got, chunk)  # chunks are asked for in ascending order
        return images

    return make_chunk


def reference_features(
    accelerator,
    data_dir: Path,
    split: str,
    resolution: int,
    extractor: Extractor,
    num: int,
    batch_size: int,
    cache_dir: Path,
) -> tuple[dict, dict, dict]:
    """(features by layer, FID statistics of the FID layer, protocol record incl. cache file hash). Every rank calls it."""
    record = reference_key(data_dir, split, resolution, extractor, num)
    path = Path(cache_dir) / f"ref-{split}-{resolution}px-{extractor.name}-{num}-{record['key']}.pt"
    if not path.is_file():
        make_images = split_chunk_reader(data_dir, split, num, batch_size, resolution, accelerator)
        gathered = distributed_features(
            accelerator,
            num,
            batch_size,
            lambda c, s, e: {"images": make_images(c, s, e)},
            extractor,
            f"reference features ({split})",
        )
        features = {key[len("feat/") :]: value for key, value in gathered.items() if key.startswith("feat/")}
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"features": features, "record": record}, tmp)
            os.replace(tmp, path)
        accelerator.wait_for_everyone()
        record["computed"] = True
    else:
        record["computed"] = False
    features = torch.load(path, map_location="cpu", weights_only=True)["features"]
    record["cache_file"] = str(path)
    record["cache_file_sha256"] = file_digest(path)
    fid_layer = extractor.layers.get("fid") or extractor.layers.get("rfid")
    stats = feature_statistics(features[fid_layer]) if fid_layer else None
    return features, stats, record
