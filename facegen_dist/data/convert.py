"""Convert a `Source` (FFHQ, Cartoon Set, a folder) into train/val WebDataset shards: parallel, resumable, verifiable.

The plan (split, items per shard) comes from the item list alone, before any image is read. Worker processes
decode, crop, resize and re-encode; the main process writes the tars in read order, each as `NAME.tar.partial`
renamed when complete and journalled with its sha256, and the manifest last. How a rerun resumes: docs/data.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import signal
import tarfile
import threading
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from facegen_dist import __version__
from facegen_dist.data.make_avatars import split_counts
from facegen_dist.data.shards import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    file_sha256,
    read_manifest,
    tar_member,
    verify_shards,
    write_json_atomic,
    write_manifest,
)
from facegen_dist.data.sources import Source, SourceItem
from facegen_dist.errors import DataError
from facegen_dist.log.progress import progress_bar

JOURNAL_FORMAT = "facegen-convert/1"
SPLITS = ("train", "val")
DEFAULT_QUALITY = {"jpg": 95, "webp": 90, "png": None, "webp-lossless": None}
SAMPLED_HASHES = 64  # source files whose sha256 the manifest lists by name (all are in the samples' JSON)


@dataclass(frozen=True)
class ConvertOptions:
    size: int
    image_format: str = "png"  # png | jpg | webp | webp-lossless
    quality: int | None = None  # jpg/webp; None: DEFAULT_QUALITY
    split: str = "seeded"  # seeded | official (the dataset's own split)
    val_fraction: float = 0.2  # the dissertation's 80/20
    seed: int = 0
    shard_size: int | None = None  # samples per shard; None: from shard_mb
    shard_mb: float = 500.0
    allow_upscale: bool = False
    background: str = "white"  # what transparent pixels become

    def __post_init__(self):
        if self.size < 8:
            raise DataError(f"--size {self.size}: must be at least 8")
        if self.image_format not in DEFAULT_QUALITY:
            raise DataError(f"--format {self.image_format}: choose one of {', '.join(DEFAULT_QUALITY)}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise DataError(f"--quality {self.quality}: must be 1..100")
        if self.split not in ("seeded", "official"):
            raise DataError(f"--split {self.split}: choose seeded or official")
        if not 0 < self.val_fraction < 1:
            raise DataError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")
        if (self.shard_size is not None and self.shard_size < 1) or self.shard_mb <= 0:
            raise DataError("--shard-size and --shard-mb must be positive")
        try:
            Image.new("RGB", (1, 1), self.background)
        except ValueError:
            raise DataError(f"--background {self.background}: not a colour PIL knows") from None

    @property
    def extension(self) -> str:
        """The file extension in the shards (what the loader looks for)."""
        return "webp" if self.image_format.startswith("webp") else self.image_format

    @property
    def resolved_quality(self) -> int | None:
        return self.quality if self.quality is not None else DEFAULT_QUALITY[self.image_format]


# ---- one image: runs in the worker processes ---------------------------------------------


def flatten_alpha(image: Image.Image, background: str) -> Image.Image:
    """RGB, with transparent pixels over `background` (convert('RGB') alone keeps whatever colour they hide)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, background), image).convert("RGB")
    return image.convert("RGB")


def encode_image(image: Image.Image, image_format: str, quality: int | None) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, "JPEG", quality=quality, subsampling=0)  # 4:4:4: no chroma blur on faces and lines
    elif image_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=4)
    elif image_format == "webp-lossless":
        image.save(buffer, "WEBP", lossless=True)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def prepare_image(payload: bytes, options: ConvertOptions) -> bytes:
    """Source bytes -> the shard's encoded square image. Raises ValueError with the reason when it cannot."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = flatten_alpha(image, options.background)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    width, height = image.size
    side = min(width, height)
    if side < options.size and not options.allow_upscale:
        raise ValueError(
            f"{width}x{height} is smaller than --size {options.size} (upscaling; pass --allow-upscale to accept it)"
        )
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != options.size:
        # PIL's Lanczos widens its kernel by the scale factor, so downscaling is antialiased.
        image = image.resize((options.size, options.size), Image.Resampling.LANCZOS)
    return encode_image(image, options.image_format, options.resolved_quality)


def _work(
    task: tuple[str, bytes | str, str | None], options: ConvertOptions
) -> tuple[bytes | None, str | None, str | None]:
    """(encoded image or None, reason it was skipped, sha256 of the source bytes)."""
    key, payload, expected_md5 = task
    if isinstance(payload, str):  # the archive could not read it: the reason
        return None, payload, None
    sha = hashlib.sha256(payload).hexdigest()
    if expected_md5 and hashlib.md5(payload).hexdigest() != expected_md5:
        return None, "MD5 differs from the dataset's metadata (corrupt or partial download)", sha
    try:
        return prepare_image(payload, options), None, sha
    except ValueError as error:
        return None, str(error), sha


# ---- the plan -----------------------------------------------------------------------------


def assign_splits(items: list[SourceItem], options: ConvertOptions) -> dict[str, str]:
    """{key: split}. Seeded: a seeded permutation of the sorted keys, the first val_fraction of it val."""
    if options.split == "official":
        missing = [item.key for item in items if item.category not in ("training", "validation")]
        if missing:
            raise DataError(
                f"--split official: {len(missing)} image(s) have no category in the dataset's metadata (e.g. {missing[0]}); "
                "put ffhq-dataset-v2.json beside the images or use --split seeded"
            )
        return {item.key: "train" if item.category == "training" else "val" for item in items}
    keys = sorted(item.key for item in items)
    _, num_val = split_counts(len(keys), options.val_fraction)
    random.Random(options.seed).shuffle(keys)
    val = set(keys[:num_val])
    return {key: "val" if key in val else "train" for key in keys}


@dataclass(frozen=True)
class Plan:
    shard_size: int
    shard_of: dict[str, str]  # key -> shard file
    shard_items: dict[str, int]  # shard file -> number of items planned for it
    order: list[str]  # shard files, train then val

    @staticmethod
    def make(items: list[SourceItem], splits: dict[str, str], shard_size: int) -> Plan:
        shard_of, shard_items = {}, {}
        # Shards follow the read order (sorted for folders and zips, the archive's for tars), so at most one shard per split is open at a time.
        by_split = {split: [item.key for item in items if splits[item.key] == split] for split in SPLITS}
        for split, keys in by_split.items():
            for position, key in enumerate(keys):
                name = f"{split}-{position // shard_size:06d}.tar"
                shard_of[key] = name
                shard_items[name] = shard_items.get(name, 0) + 1
        return Plan(
            shard_size, shard_of, shard_items, sorted(shard_items, key=lambda n: (SPLITS.index(n.split("-")[0]), n))
        )


def estimate_shard_size(source: Source, options: ConvertOptions, probe: int = 16) -> int:
    """Samples per shard for ~options.shard_mb MB, from the encoded size of the first readable images."""
    sizes = []
    for key, payload in source.archive.read_many([item.member for item in source.items[:probe]]):
        if isinstance(payload, bytes):
            try:
                sizes.append(len(prepare_image(payload, options)) + 1024)  # + tar headers and JSON
            except ValueError:
                pass
    if not sizes:
        raise DataError(f"{source.description['path']}: none of the first {probe} images could be read; check --src")
    return max(1, int(options.shard_mb * 1e6 * len(sizes) / sum(sizes)))


# ---- the journal: what a rerun may keep ---------------------------------------------------


def _fingerprint(source: Source) -> dict:
    keys = hashlib.sha256("\n".join(f"{item.key} {item.member}" for item in source.items).encode()).hexdigest()
    return {
        "name": source.name,
        "path": source.description["path"],
        "num_items": len(source.items),
        "items_sha256": keys,
    }


def _load_journal(out_dir: Path, expected: dict) -> dict:
    """Journalled shards still intact on disk (a fresh journal when there is none)."""
    path = out_dir / JOURNAL_NAME
    if not path.is_file():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise DataError(
                f"--out {out_dir}: exists, is not empty and holds no unfinished conversion; choose another --out"
            )
        return {**expected, "done": {}}
    try:
        journal = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(
            f"{path}: damaged journal of an unfinished conversion; delete --out {out_dir} and convert again"
        ) from None
    for field_name in ("options", "source"):
        if journal.get(field_name) != expected[field_name]:
            theirs, ours = journal.get(field_name, {}), expected[field_name]
            diff = ", ".join(
                f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}"
                for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)
            )
            raise DataError(
                f"--out {out_dir}: holds an unfinished conversion with other {field_name} ({diff}); rerun it as it was, or choose another --out"
            )
    intact = {}
    for name, entry in journal["done"].items():
        if entry["num_samples"] == 0 or ((out_dir / name).is_file() and file_sha256(out_dir / name) == entry["sha256"]):
            intact[name] = entry
    journal["done"] = intact
    return journal


class _ShardBeingWritten:
    """One planned shard, written to NAME.tar.partial and renamed when its last planned item is in."""

    def __init__(self, out_dir: Path, name: str):
        self.path = out_dir / name
        self.partial = out_dir / (name + ".partial")
        self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)
        self.entry = {"file": name, "num_samples": 0, "skipped": [], "sampled_sources": []}
        self.source_digest = hashlib.sha256()
        self.seen = 0

    def add(
        self,
        item: SourceItem,
        image: bytes | None,
        reason: str | None,
        sha: str | None,
        extension: str,
        sample_source: bool,
    ) -> None:
        self.seen += 1
        if sha:
            self.source_digest.update(f"{item.key} {sha}\n".encode())
            if sample_source:
                self.entry["sampled_sources"].append({"key": item.key, "file": item.member, "sha256": sha})
        if image is None:
            self.entry["skipped"].append({"file": item.member, "reason": reason})
            return
        record = {**item.info, "source": item.member, "source_sha256": sha}
        for extension, payload in ((extension, image), ("json", json.dumps(record, sort_keys=True).encode())):
            self.tar.addfile(*tar_member(f"{item.key}.{extension}", payload))
        self.entry["num_samples"] += 1

    def finish(self) -> dict:
        self.tar.close()
        if self.entry["num_samples"]:
            os.replace(self.partial, self.path)
            self.entry["bytes"] = self.path.stat().st_size
            self.entry["sha256"] = file_sha256(self.path)
        else:  # every planned image was unreadable: no empty tar for the loader to trip on
            self.partial.unlink()
        self.entry["source_digest"] = self.source_digest.hexdigest()
        return self.entry


# ---- the conversion -----------------------------------------------------------------------


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool (one message, not one traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _bounded(iterable, semaphore: threading.Semaphore):
    """Pool.imap reads its input as fast as it can; this holds it to the semaphore's window (images are MBs each)."""
    for value in iterable:
        semaphore.acquire()
        yield value


def convert(
    source: Source,
    out_dir: str | os.PathLike,
    options: ConvertOptions,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Convert `source` into shards in `out_dir` (resuming an interrupted run of the same command); returns the manifest."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).is_file() and not (out_dir / JOURNAL_NAME).is_file():
        return _already_converted(out_dir, source, options)
    if source.native_size and source.native_size < options.size and not options.allow_upscale:
        raise DataError(f"--size {options.size}: the source is {source.native_size} px; that would upscale every image")
    if len(source.items) < 2:
        raise DataError(
            f"--src {source.description['path']}: found {len(source.items)} image(s); a train/val split needs at least 2"
        )
    splits = assign_splits(source.items, options)
    journal = _load_journal(
        out_dir, {"format": JOURNAL_FORMAT, "options": asdict(options), "source": _fingerprint(source)}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    journal.setdefault("shard_size", options.shard_size or estimate_shard_size(source, options))
    plan = Plan.make(source.items, splits, journal["shard_size"])
    for leftover in out_dir.glob("*.tar.partial"):
        leftover.unlink()
    write_json_atomic(out_dir / JOURNAL_NAME, journal, indent=1)

    todo = [item for item in source.items if plan.shard_of[item.key] not in journal["done"]]
    sample_every = max(1, len(source.items) // SAMPLED_HASHES)
    sampled = {item.key for index, item in enumerate(source.items) if index % sample_every == 0}
    if todo:
        _convert_items(source, todo, plan, journal, out_dir, options, sampled, workers or os.cpu_count() or 1, progress)
    manifest = _manifest(source, options, plan, journal, splits)
    write_manifest(out_dir, manifest)
    (out_dir / JOURNAL_NAME).unlink()
    return manifest


def _convert_items(source, todo, plan, journal, out_dir, options, sampled, workers, progress) -> None:
    members = {item.member: item for item in todo}
    open_shards: dict[str, _ShardBeingWritten] = {}
    window = threading.Semaphore(8 * workers)

    def tasks():
        for member, payload in source.archive.read_many([item.member for item in todo]):
            item = members[member]
            yield item.key, payload if isinstance(payload, bytes) else f"cannot read it ({payload})", item.expected_md5

    work = partial(_work, options=options)
    description = f"{source.name} -> {options.size}px {options.image_format}"
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint) if workers > 1 else None
    try:
        # imap yields in order and only this process writes tars: byte-identical output whatever the worker count.
        results = pool.imap(work, _bounded(tasks(), window), chunksize=2) if pool else map(work, tasks())
        for item, (image, reason, sha) in zip(
            todo, progress_bar(results, total=len(todo), desc=description, unit="img", disable=not progress)
        ):
            window.release()
            name = plan.shard_of[item.key]
            shard = open_shards.get(name) or open_shards.setdefault(name, _ShardBeingWritten(out_dir, name))
            shard.add(item, image, reason, sha, options.extension, item.key in sampled)
            if shard.seen == plan.shard_items[name]:
                journal["done"][name] = open_shards.pop(name).finish()
                write_json_atomic(out_dir / JOURNAL_NAME, journal, indent=1)
    finally:
        for shard in open_shards.values():
            shard.tar.close()  # left as .partial: discarded by the rerun
        if pool:
            pool.terminate()


def _manifest(source: Source, options: ConvertOptions, plan: Plan, journal: dict, splits: dict[str, str]) -> dict:
    done = journal["done"]
    entries = {split: [done[name] for name in plan.order if name.startswith(split + "-")] for split in SPLITS}
    skipped = [{"file": file, "reason": reason} for file, reason in source.problems]
    skipped += [record for name in plan.order for record in done[name]["skipped"]]
    shards_out = {
        split: [
            {k: e[k] for k in ("file", "num_samples", "bytes", "sha256")} for e in entries[split] if e["num_samples"]
        ]
        for split in SPLITS
    }
    for split in SPLITS:
        if not shards_out[split]:
            raise DataError(
                f"no readable image landed in the {split} split ({len(skipped)} skipped; first: {skipped[0] if skipped else '-'})"
            )
    source_digest = hashlib.sha256("".join(done[name]["source_digest"] for name in plan.order).encode()).hexdigest()
    manifest = {
        "name": source.name,
        "tool": f"facegen-dist {__version__}",
        "image_size": options.size,
        "image_format": options.image_format,
        "num_samples": sum(e["num_samples"] for split in SPLITS for e in shards_out[split]),
        "splits": {
            split: {"num_samples": sum(e["num_samples"] for e in shards_out[split]), "shards": shards_out[split]}
            for split in SPLITS
        },
        "conversion": {
            **asdict(options),
            "quality": options.resolved_quality,
            "shard_size": plan.shard_size,
            "resize": "centre crop to square, PIL Lanczos (antialiased)",
            "split_counts_planned": {s: sum(1 for v in splits.values() if v == s) for s in SPLITS},
        },
        "source": {
            **source.description,
            "num_items": len(source.items),
            "sha256_of_files": source_digest,
            "sampled_files": [record for name in plan.order for record in done[name]["sampled_sources"]],
        },
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    if source.attributes is not None:
        manifest["attributes"] = source.attributes
    return manifest


def _already_converted(out_dir: Path, source: Source, options: ConvertOptions) -> dict:
    manifest = read_manifest(out_dir)
    conversion = {k: v for k, v in manifest.get("conversion", {}).items() if k in asdict(options)}
    if conversion != {**asdict(options), "quality": options.resolved_quality} and conversion != asdict(options):
        raise DataError(
            f"--out {out_dir}: already holds a finished conversion with other options; choose another --out"
        )
    if manifest.get("source", {}).get("path") != source.description["path"]:
        raise DataError(
            f"--out {out_dir}: already holds a conversion of {manifest.get('source', {}).get('path')}; choose another --out"
        )
    problems = verify_shards(out_dir)
    if problems:
        raise DataError(
            f"--out {out_dir}: finished earlier but {len(problems)} shard(s) fail verification ({problems[0]}); delete the folder and convert again"
        )
    return manifest
