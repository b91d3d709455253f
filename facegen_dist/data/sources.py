"""Where the images of a conversion come from: FFHQ, Google Cartoon Set, or any folder of images.

A source is an `Archive` (a folder, a zip or a tar/tgz) and the list of `SourceItem`s to convert, in the order
the archive reads fastest (sorted for folders and zips, the archive's own order for tars, which cannot seek).
Each finder checks the layout it expects and says in one line what it found instead.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from facegen_dist.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")


class Archive:
    """Files under a folder or inside a zip or tar, named by '/'-separated paths relative to it."""

    def __init__(self, path: Path):
        self.path = path
        self.kind = "folder" if path.is_dir() else "zip" if path.suffix.lower() == ".zip" else "tar"

    def scan(self, keep: Callable[[str], bool] = lambda name: False) -> tuple[list[str], dict[str, bytes]]:
        """Every file name in read order, and the contents of those `keep` selects (small files: CSVs)."""
        if self.kind == "folder":
            names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
            return names, {name: (self.path / name).read_bytes() for name in names if keep(name)}
        if self.kind == "zip":
            with self._open_zip() as archive:
                names = sorted(info.filename for info in archive.infolist() if not info.is_dir())
                return names, {name: archive.read(name) for name in names if keep(name)}
        names, kept = [], {}
        with self._open_tar() as archive:
            for member in archive:
                if member.isfile():
                    names.append(member.name)
                    if keep(member.name):
                        kept[member.name] = archive.extractfile(member).read()
        return names, kept

    def read_many(self, names: list[str]) -> Iterator[tuple[str, bytes | Exception]]:
        """(name, bytes) for each name in order, or (name, the error) when that file cannot be read.

        For a tar, `names` must be in the archive's order (as `scan` returned them): it is read in one pass.
        """
        if self.kind == "folder":
            for name in names:
                try:
                    yield name, (self.path / name).read_bytes()
                except OSError as error:
                    yield name, error
        elif self.kind == "zip":
            with self._open_zip() as archive:
                for name in names:
                    try:
                        yield name, archive.read(name)
                    except (zipfile.BadZipFile, OSError, EOFError) as error:  # a CRC mismatch is BadZipFile
                        yield name, error
        else:
            wanted = iter(names)
            target = next(wanted, None)
            try:
                with self._open_tar() as archive:
                    for member in archive:
                        if target is None:
                            return
                        if member.name == target:
                            yield target, archive.extractfile(member).read()
                            target = next(wanted, None)
            except (tarfile.TarError, OSError, EOFError) as error:
                if target is not None:
                    yield target, error
                for name in wanted:
                    yield name, DataError("the archive ended before this file")
                return
            if target is not None:
                raise DataError(f"{self.path}: read_many got names out of the archive's order (at {target})")

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise DataError(f"{self.path}: not a readable zip ({error})") from None

    def _open_tar(self) -> tarfile.TarFile:
        try:
            return tarfile.open(self.path, "r|*")  # a stream: a .tgz is decompressed once, front to back
        except (tarfile.TarError, OSError) as error:
            raise DataError(f"{self.path}: not a readable tar ({error})") from None


def open_archive(src: str | Path) -> Archive:
    path = Path(src)
    if not path.exists():
        raise DataError(f"--src {src}: no such file or folder")
    name = path.name.lower()
    if path.is_file() and not (name.endswith(".zip") or name.endswith(TAR_SUFFIXES)):
        raise DataError(f"--src {src}: a file, but not a .zip, .tar or .tgz archive")
    return Archive(path)


@dataclass(frozen=True)
class SourceItem:
    key: str  # the sample's key in the shards
    member: str  # its file in the archive
    info: dict = field(default_factory=dict)  # stored in the sample's JSON (attributes, metadata)
    expected_md5: str | None = None  # from the dataset's own metadata, checked on conversion
    category: str | None = None  # the dataset's own split, when it has one


@dataclass
class Source:
    name: str  # dataset name written to the manifest
    archive: Archive
    items: list[SourceItem]
    description: dict  # what was found where, for the manifest
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) found while scanning
    attributes: dict[str, list] | None = None  # attribute vocabulary, when the samples carry attributes
    native_size: int | None = None  # the source's side in px when the layout fixes it


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _stem(name: str) -> str:
    return PurePosixPath(name).name.split(".", 1)[0]


# ---- FFHQ ---------------------------------------------------------------------------------

FFHQ_LAYOUTS = {"images1024x1024": 1024, "thumbnails128x128": 128}
FFHQ_METADATA = "ffhq-dataset-v2.json"
_FFHQ_FILE = re.compile(r"(?:^|/)(\d{5})\.png$")


def _ffhq_candidates(src: Path) -> dict[str, Path]:
    """The official layouts found at `src`: {layout: folder or zip}."""
    if src.is_file():
        return {_layout_of_zip(src): src}
    if src.name in FFHQ_LAYOUTS:
        return {src.name: src}
    found = {}
    for layout in FFHQ_LAYOUTS:
        for candidate in (src / layout, src / f"{layout}.zip"):
            if candidate.exists() and layout not in found:
                found[layout] = candidate
    return found


def _layout_of_zip(path: Path) -> str:
    for layout in FFHQ_LAYOUTS:
        if layout in path.name:
            return layout
    with Archive(path)._open_zip() as archive:
        names = archive.namelist()[:10]
    return next((layout for layout in FFHQ_LAYOUTS if any(layout in name for name in names)), "images1024x1024")


def _ffhq_metadata(src: Path) -> tuple[dict | None, Path | None]:
    for folder in (src if src.is_dir() else src.parent, (src if src.is_dir() else src.parent).parent):
        path = folder / FFHQ_METADATA
        if path.is_file():
            try:
                return json.loads(path.read_text()), path
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise DataError(f"{path}: not valid JSON ({error}); delete or re-download it") from None
    return None, None


def ffhq_source(src: str | Path, size: int) -> Source:
    """FFHQ as NVIDIA publishes it: `images1024x1024/` (or `thumbnails128x128/`), flat or in 1000-image folders, or their zips.

    The thumbnails are used when --size is 128 or less (they are the 1024 images, antialiased
    down), so a 128 px set does not decode 89 GB of PNG. With `ffhq-dataset-v2.json` beside the
    layout, each image's MD5 is checked and its category (training/validation) and Flickr
    metadata (author, license) go into its JSON.
    """
    src = Path(src)
    if not src.exists():
        raise DataError(f"--src {src}: no such file or folder")
    candidates = _ffhq_candidates(src)
    if not candidates:
        raise DataError(
            f"--src {src}: no FFHQ here (expected images1024x1024/ or thumbnails128x128/, a folder of them or their .zip)"
        )
    layout = "thumbnails128x128" if size <= 128 and "thumbnails128x128" in candidates else "images1024x1024"
    if layout not in candidates:
        raise DataError(
            f"--src {src}: only thumbnails128x128 found, which cannot make {size} px images without upscaling; add images1024x1024"
        )
    archive = Archive(candidates[layout])
    names, _ = archive.scan()
    metadata, metadata_path = _ffhq_metadata(src)
    json_field = "image" if layout == "images1024x1024" else "thumbnail"
    items, seen, ignored = [], {}, 0
    for name in names:
        match = _FFHQ_FILE.search(name)
        if not match:
            ignored += 1
            continue
        index = int(match.group(1))
        if index in seen:
            raise DataError(f"--src {src}: image {index:05d} twice ({seen[index]} and {name}); point --src at one copy")
        seen[index] = name
        entry = (metadata or {}).get(str(index), {})
        info = {"ffhq_index": index}
        for key in ("category", "metadata"):
            if key in entry:
                info[key] = entry[key]
        items.append(
            SourceItem(
                key=f"{index:05d}",
                member=name,
                info=info,
                expected_md5=entry.get(json_field, {}).get("file_md5"),
                category=entry.get("category"),
            )
        )
    if not items:
        raise DataError(f"--src {src}: {archive.path} holds no FFHQ images (NNNNN.png); {ignored} other file(s)")
    description = {
        "kind": archive.kind,
        "path": str(archive.path.resolve()),
        "layout": layout,
        "metadata": str(metadata_path.resolve()) if metadata_path else None,
        "ignored_files": ignored,
    }
    return Source("ffhq", archive, items, description, native_size=FFHQ_LAYOUTS[layout])


# ---- Google Cartoon Set -------------------------------------------------------------------


def parse_cartoon_csv(payload: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """A Cartoon Set CSV (`"eye_angle", 1, 3` per line) -> ({attribute: value}, {attribute: number of values})."""
    values, counts = {}, {}
    for row in csv.reader(io.StringIO(payload.decode("utf-8")), skipinitialspace=True):
        if not row:
            continue
        if len(row) != 3:
            raise ValueError(f"line {row!r} is not `name, value, count`")
        name, value, count = row[0].strip(), int(row[1]), int(row[2])
        if not 0 <= value < count:
            raise ValueError(f"{name}={value} is outside 0..{count - 1}")
        values[name], counts[name] = value, count
    if not values:
        raise ValueError("no attributes")
    return values, counts


def cartoonset_source(src: str | Path) -> Source:
    """Google Cartoon Set 10k/100k: `csNNN.png` with `csNNN.csv` beside it, in a folder (any depth), a .tgz or a zip."""
    archive = open_archive(src)
    names, csvs = archive.scan(keep=lambda name: name.lower().endswith(".csv"))
    by_base = {name.rsplit(".", 1)[0]: name for name in csvs}
    items, problems, vocabulary, owner = [], [], {}, {}
    for name in names:
        if not name.lower().endswith(".png"):
            continue
        key = _safe_key(_stem(name))  # Cartoon Set file names are unique ids: the key, without the folder
        if key in owner:
            problems.append((name, f"same id as {owner[key]}; skipped"))
            continue
        owner[key] = name
        csv_name = by_base.get(name.rsplit(".", 1)[0])
        if csv_name is None:
            problems.append((name, "no CSV of attributes beside it"))
            continue
        try:
            values, counts = parse_cartoon_csv(csvs[csv_name])
        except (ValueError, UnicodeDecodeError) as error:
            problems.append((csv_name, f"unreadable attributes: {error}"))
            continue
        for attribute, count in counts.items():
            vocabulary[attribute] = max(vocabulary.get(attribute, 0), count)
        items.append(SourceItem(key=key, member=name, info=values))
    if not items:
        raise DataError(
            f"--src {src}: no Cartoon Set images here (csNNN.png with csNNN.csv); found {len(names)} file(s)"
        )
    description = {"kind": archive.kind, "path": str(archive.path.resolve()), "layout": "png+csv"}
    return Source(
        "cartoonset",
        archive,
        items,
        description,
        problems,
        attributes={name: list(range(count)) for name, count in sorted(vocabulary.items())},
    )


# ---- any folder of images -----------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe_key(name: str) -> str:
    """A WebDataset key for a file: its path without the extension, each run of other characters (dots, '/') as '_'.

    WebDataset splits a member name at the first dot of its base name, so keys carry no dots.
    """
    return _UNSAFE.sub("_", name.rsplit(".", 1)[0]).strip("_") or "image"


def folder_source(src: str | Path) -> Source:
    """Every image under a folder (or in a zip/tar), keyed by its relative path."""
    archive = open_archive(src)
    names, _ = archive.scan()
    items, problems, owner = [], [], {}
    for name in names:
        if not _is_image(name):
            continue
        key = _safe_key(name)
        if key in owner:
            problems.append((name, f"same key '{key}' as {owner[key]}; skipped"))
            continue
        owner[key] = name
        items.append(SourceItem(key=key, member=name))
    if not items:
        raise DataError(f"--src {src}: no images here ({', '.join(IMAGE_SUFFIXES)}); found {len(names)} other file(s)")
    description = {
        "kind": archive.kind,
        "path": str(archive.path.resolve()),
        "ignored_files": len(names) - len(items) - len(problems),
    }
    return Source(Path(src).name.split(".")[0] or "folder", archive, items, description, problems)
