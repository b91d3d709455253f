"""WebDataset tar shards and their manifest.

A shard is a plain WebDataset tar: `KEY.png` (or .jpg/.webp) and `KEY.json` per sample. The manifest
(`manifest.json` beside the shards) lists every split's shards with sample counts and sha256, so the loader
places any stream position without reading earlier shards, and `verify` finds corrupt or missing files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from facegen_dist.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "facegen-shards/1"
JOURNAL_NAME = ".facegen-convert.json"  # an unfinished `facegen data ffhq|cartoonset|folder` (convert.py)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # absolute path or URL
    num_samples: int


# Python's tarfile, not webdataset.TarWriter, which stamps the current time into each member: fixed headers
# make a shard set byte-identical for a seed, so its checksums double as a determinism test.
def tar_member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(payload)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Writes samples into `{prefix}-NNNNNN.tar` files of at most `samples_per_shard` samples."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, samples_per_shard: int):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _open_next(self) -> None:
        self.start(f"{self.prefix}-{len(self.shards):06d}.tar")

    def start(self, name: str) -> None:
        """Close the current shard and write the next samples to one named `name`."""
        self.close()
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"file": name, "num_samples": 0})
        self._count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        for extension, payload in sorted(files.items()):
            self._tar.addfile(*tar_member(f"{key}.{extension}", payload))
        self._count += 1
        self.shards[-1]["num_samples"] = self._count

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            entry = self.shards[-1]
            path = self.out_dir / entry["file"]
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = file_sha256(path)


def write_json_atomic(path: str | os.PathLike, record: dict, indent: int = 2, sort_keys: bool = True) -> None:
    """Write JSON to a temporary file beside `path` and rename it into place: readers see the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=indent, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, {"format": MANIFEST_FORMAT, **manifest})


def splits_summary(manifest: dict) -> str:
    """`train 27 in 3 shards, val 3 in 1 shards`: what a command that wrote shards reports."""
    return ", ".join(
        f"{name} {info['num_samples']} in {len(info['shards'])} shards" for name, info in manifest["splits"].items()
    )


def read_manifest(shard_dir: str | os.PathLike) -> dict:
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        if (Path(shard_dir) / JOURNAL_NAME).is_file():
            raise DataError(
                f"{shard_dir}: an unfinished conversion (no {MANIFEST_NAME} yet); run the same `facegen data` command again to finish it"
            )
        raise DataError(f"{shard_dir}: no {MANIFEST_NAME}; make shards with `facegen data avatars --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: format '{manifest.get('format')}' is not {MANIFEST_FORMAT}")
    return manifest


def split_shards(shard_dir: str | os.PathLike, split: str) -> list[ShardInfo]:
    manifest = read_manifest(shard_dir)
    splits = manifest.get("splits", {})
    if split not in splits or not splits[split]["shards"]:
        raise DataError(f"{shard_dir}: manifest has no '{split}' shards (splits: {sorted(splits)})")
    root = Path(shard_dir).resolve()
    shards = []
    for entry in splits[split]["shards"]:
        count = entry.get("num_samples")
        if not isinstance(count, int) or count <= 0:
            # The stream locates positions by these counts: a zero would make it search forever.
            raise DataError(
                f"{shard_dir}: manifest gives {entry.get('file')} a sample count of {count!r}; run `facegen data verify {shard_dir}`"
            )
        shards.append(ShardInfo(str(root / entry["file"]), count))
    return shards


class ShardReadError(Exception):
    """A shard ended early or could not be opened; carries the samples read before that."""


def _file_entries(path: str, stream) -> Iterator[dict]:
    for entry in tar_file_iterator(stream):
        entry["__url__"] = path
        yield entry


def iter_shard_samples(path: str) -> Iterator[dict[str, bytes]]:
    """Samples of one shard in order, as {"__key__": key, ext: bytes}. Raises ShardReadError when it is damaged.

    `path` may be anything webdataset's gopen opens: a file, `pipe:CMD`, or a URL.
    Grouping by key is webdataset's own, so any WebDataset-format shard reads the same here.
    A sample cut off by damage is not yielded: only whole samples come out.
    """
    try:
        with gopen(path, "rb") as stream:
            yield from group_by_keys(_file_entries(path, stream))
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise ShardReadError(f"{path}: {error}") from None


def read_shard(path: str) -> tuple[list[dict[str, bytes]], str | None]:
    """All readable samples of a shard, and the reason it stopped early (None if intact)."""
    samples: list[dict[str, bytes]] = []
    try:
        for sample in iter_shard_samples(path):
            samples.append(sample)
    except ShardReadError as error:
        return samples, str(error)
    return samples, None


def verify_shards(shard_dir: str | os.PathLike) -> list[str]:
    """Problems found checking every shard against the manifest (empty list: all good)."""
    manifest = read_manifest(shard_dir)
    problems = []
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            path = Path(shard_dir) / entry["file"]
            name, count = f"{split}/{entry['file']}", entry.get("num_samples")
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            if not entry.get("sha256"):
                problems.append(f"{name}: the manifest has no sha256 for it (cannot be checked)")
            elif file_sha256(path) != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest (corrupt or rewritten)")
            samples, damage = read_shard(str(path))
            if damage:
                problems.append(f"{name}: {damage}")
            if not isinstance(count, int) or count <= 0 or len(samples) != count:
                problems.append(f"{name}: holds {len(samples)} samples, the manifest says {count!r}")
    return problems


def image_extension(sample: dict[str, bytes]) -> str | None:
    for extension in ("png", "jpg", "jpeg", "webp"):
        if extension in sample:
            return extension
    return None


def iter_keys(samples: Iterable[dict]) -> list[str]:
    return [sample["__key__"] for sample in samples]
