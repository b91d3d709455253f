"""`facegen data ffhq|cartoonset|folder`: real layouts built here in miniature, converted, checked, resumed, streamed."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, read_metrics, run_train
from PIL import Image

from facegen_dist.data.convert import JOURNAL_NAME, ConvertOptions, assign_splits, convert
from facegen_dist.data.shards import iter_shard_samples, read_manifest, split_shards, verify_shards
from facegen_dist.data.sources import ffhq_source, folder_source, parse_cartoon_csv
from facegen_dist.errors import DataError

FFHQ_NUM = 40
CORRUPT, WRONG_MD5 = 7, 12  # a truncated PNG, and one whose bytes differ from the metadata's MD5


def photo(seed: int, size: int, mode: str = "RGB") -> bytes:
    """A smooth random image (upsampled noise: compresses like a photo, unlike flat colour)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    small.convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def make_ffhq(root: Path, side: int = 48, layout: str = "images1024x1024", num: int = FFHQ_NUM) -> Path:
    """FFHQ as NVIDIA ships it: LAYOUT/00000/00000.png in folders of 1000 (here 10), ffhq-dataset-v2.json beside it."""
    metadata = {}
    for index in range(num):
        data = photo(index, side)
        expected_md5 = hashlib.md5(data).hexdigest()
        if index == CORRUPT:
            data = data[:150]
            expected_md5 = hashlib.md5(data).hexdigest()  # matches: the file is simply broken
        if index == WRONG_MD5:
            data = photo(1000 + index, side)
        relative = f"{layout}/{index // 10 * 10:05d}/{index:05d}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
        field = "image" if layout == "images1024x1024" else "thumbnail"
        metadata[str(index)] = {
            "category": "training" if index < 30 else "validation",
            "metadata": {"license": "CC BY 2.0", "author": f"a{index}"},
            field: {"file_path": relative, "file_md5": expected_md5},
        }
    (root / layout / "LICENSE.txt").write_text("not an image")
    (root / "ffhq-dataset-v2.json").write_text(json.dumps(metadata))
    return root


def samples_by_key(out: Path) -> dict[str, dict]:
    manifest = read_manifest(out)
    return {
        sample["__key__"]: sample
        for split in manifest["splits"]
        for shard in split_shards(out, split)
        for sample in iter_shard_samples(shard.path)
    }


def facegen(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facegen_dist.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.fixture(scope="module")
def ffhq_root(tmp_path_factory) -> Path:
    return make_ffhq(tmp_path_factory.mktemp("ffhq"))


def test_ffhq_seeded_split_keys_metadata_and_skips(ffhq_root, tmp_path):
    out = tmp_path / "ffhq32"
    done = facegen(
        "data",
        "ffhq",
        "--src",
        str(ffhq_root),
        "--out",
        str(out),
        "--size",
        "32",
        "--shard-size",
        "8",
        "--workers",
        "2",
    )
    assert done.returncode == 0, done.stderr
    expected = assign_splits(ffhq_source(ffhq_root, 32).items, ConvertOptions(size=32))
    skipped = {f"{CORRUPT:05d}", f"{WRONG_MD5:05d}"}
    num_val = sum(1 for key, split in expected.items() if split == "val" and key not in skipped)
    assert f"train {38 - num_val} in 4 shards, val {num_val} in 1 shards (32 px png)" in done.stdout
    assert "00007.png" in done.stderr and "00012.png" in done.stderr and "2 source file(s) skipped" in done.stderr
    manifest = read_manifest(out)
    assert (
        manifest["name"] == "ffhq"
        and manifest["image_size"] == 32
        and manifest["source"]["layout"] == "images1024x1024"
    )
    assert manifest["conversion"]["split_counts_planned"] == {"train": 32, "val": 8}  # 80/20 of 40, before skips
    reasons = {Path(record["file"]).name: record["reason"] for record in manifest["skipped"]}
    assert "truncated" in reasons["00007.png"] and "MD5" in reasons["00012.png"]
    assert manifest["source"]["ignored_files"] == 1  # LICENSE.txt
    samples = samples_by_key(out)
    assert sorted(samples) == [f"{i:05d}" for i in range(FFHQ_NUM) if i not in (CORRUPT, WRONG_MD5)]
    record = json.loads(samples["00003"]["json"])
    assert record["ffhq_index"] == 3 and record["metadata"]["author"] == "a3" and record["category"] == "training"
    assert (
        record["source_sha256"]
        == hashlib.sha256((ffhq_root / "images1024x1024/00000/00003.png").read_bytes()).hexdigest()
    )
    with Image.open(io.BytesIO(samples["00003"]["png"])) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    # The split is a seeded permutation of all keys: the same keys as assign_splits gives, skips aside.
    val_keys = {sample["__key__"] for shard in split_shards(out, "val") for sample in iter_shard_samples(shard.path)}
    assert val_keys == {key for key, split in expected.items() if split == "val"} - skipped
    assert verify_shards(out) == []


def test_ffhq_official_split_thumbnails_and_zip_give_the_same_images(ffhq_root, tmp_path):
    official = convert(
        ffhq_source(ffhq_root, 32),
        tmp_path / "official",
        ConvertOptions(size=32, split="official", shard_size=100),
        workers=1,
        progress=False,
    )
    # categories, minus 2 skipped
    assert official["splits"]["val"]["num_samples"] == 10 and official["splits"]["train"]["num_samples"] == 28

    thumbs = make_ffhq(tmp_path / "both", side=40, layout="thumbnails128x128")
    make_ffhq(thumbs, side=80, layout="images1024x1024")
    # <= 128 px: no need to decode the big ones
    assert ffhq_source(thumbs, 32).description["layout"] == "thumbnails128x128"
    assert ffhq_source(thumbs, 256).description["layout"] == "images1024x1024"

    zipped = tmp_path / "zipped"
    zipped.mkdir()
    (zipped / "ffhq-dataset-v2.json").write_bytes((ffhq_root / "ffhq-dataset-v2.json").read_bytes())
    with zipfile.ZipFile(zipped / "images1024x1024.zip", "w") as archive:
        for path in sorted((ffhq_root / "images1024x1024").rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(ffhq_root).as_posix())
    from_zip = convert(
        ffhq_source(zipped, 32), tmp_path / "from_zip", ConvertOptions(size=32, shard_size=8), workers=2, progress=False
    )
    from_folder = convert(
        ffhq_source(ffhq_root, 32),
        tmp_path / "from_folder",
        ConvertOptions(size=32, shard_size=8),
        workers=1,
        progress=False,
    )
    assert from_zip["source"]["kind"] == "zip" and from_zip["num_samples"] == from_folder["num_samples"] == 38
    zip_samples, folder_samples = samples_by_key(tmp_path / "from_zip"), samples_by_key(tmp_path / "from_folder")
    assert zip_samples.keys() == folder_samples.keys()
    assert all(zip_samples[key]["png"] == folder_samples[key]["png"] for key in zip_samples)
    assert from_zip["source"]["sha256_of_files"] == from_folder["source"]["sha256_of_files"]


def test_workers_do_not_change_a_single_byte(ffhq_root, tmp_path):
    one = convert(
        ffhq_source(ffhq_root, 24),
        tmp_path / "one",
        ConvertOptions(size=24, shard_size=8, image_format="jpg"),
        workers=1,
        progress=False,
    )
    two = convert(
        ffhq_source(ffhq_root, 24),
        tmp_path / "two",
        ConvertOptions(size=24, shard_size=8, image_format="jpg"),
        workers=2,
        progress=False,
    )
    assert one["splits"] == two["splits"]  # file names, counts, sha256 of every shard
    assert one["conversion"]["quality"] == 95 and next(iter(samples_by_key(tmp_path / "one").values())).get("jpg")


def test_kill9_then_rerun_resumes_without_duplicates(tmp_path):
    root = make_ffhq(tmp_path / "src", side=256, num=120)
    args = ["--src", str(root), "--size", "64", "--shard-size", "4", "--workers", "1"]
    reference = facegen("data", "ffhq", *args, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "facegen_dist.cli", "data", "ffhq", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    done = {}
    while time.time() < deadline and process.poll() is None:
        try:
            done = json.loads((out / JOURNAL_NAME).read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = {}
        if len(done) >= 3:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(done) >= 3 and not (out / "manifest.json").exists(), "the conversion must be killed part-way"
    unfinished = facegen("data", "verify", str(out))
    assert unfinished.returncode == 2 and "unfinished conversion" in unfinished.stderr
    finished = sorted(name for name, entry in done.items() if entry["num_samples"])
    damaged = out / finished[0]  # a finished shard damaged since: the rerun must notice and redo it
    damaged.write_bytes(damaged.read_bytes()[:1000])
    kept = {name: (out / name).stat().st_mtime_ns for name in finished[1:]}

    resumed = facegen("data", "ffhq", *args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    # intact finished shards were checked, not rewritten
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    # same files, counts and sha256
    assert read_manifest(out)["splits"] == read_manifest(tmp_path / "reference")["splits"]
    keys = [
        sample["__key__"]
        for split in ("train", "val")
        for shard in split_shards(out, split)
        for sample in iter_shard_samples(shard.path)
    ]
    assert len(keys) == len(set(keys)) == 118
    assert not list(out.glob("*.partial")) and not (out / JOURNAL_NAME).exists()


def make_cartoonset(root: Path, num: int = 24) -> Path:
    """cartoonset10k/csNNN.png (RGBA, transparent background) with csNNN.csv of `"name", value, count` lines."""
    folder = root / "cartoonset10k"
    folder.mkdir(parents=True)
    for index in range(num):
        image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
        image.paste((200, 40 + index, 40, 255), (30, 30, 70, 70))
        image.save(folder / f"cs{1000 + index}.png")
        rows = [["eye_angle", index % 3, 3], ["face_color", index % 11, 11], ["hair", index % 111, 111]]
        with open(folder / f"cs{1000 + index}.csv", "w", newline="") as handle:
            csv.writer(handle, quoting=csv.QUOTE_NONNUMERIC).writerows(rows)
    (folder / "cs1000.csv").rename(folder / "cs1000.txt")  # an image without its attributes
    (folder / "cs1001.csv").write_text('"eye_angle", 7, 3\n')  # an attribute out of range
    return root


def test_cartoonset_folder_and_tgz_attributes_and_transparency(tmp_path):
    root = make_cartoonset(tmp_path / "src")
    with tarfile.open(tmp_path / "cartoonset10k.tgz", "w:gz") as archive:
        archive.add(root / "cartoonset10k", arcname="cartoonset10k")
    for src in (root / "cartoonset10k", tmp_path / "cartoonset10k.tgz"):
        out = tmp_path / f"out-{src.name}"
        done = facegen(
            "data",
            "cartoonset",
            "--src",
            str(src),
            "--out",
            str(out),
            "--size",
            "32",
            "--shard-size",
            "5",
            "--workers",
            "2",
        )
        assert done.returncode == 0, done.stderr
        manifest = read_manifest(out)
        assert manifest["num_samples"] == 22 and manifest["num_skipped"] == 2
        assert manifest["attributes"] == {
            "eye_angle": [0, 1, 2],
            "face_color": list(range(11)),
            "hair": list(range(111)),
        }
        samples = samples_by_key(out)
        attributes = json.loads(samples["cs1005"]["json"])
        assert {k: attributes[k] for k in ("eye_angle", "face_color", "hair")} == {
            "eye_angle": 2,
            "face_color": 5,
            "hair": 5,
        }
        with Image.open(io.BytesIO(samples["cs1005"]["png"])) as image:
            assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent background over white, not black
            assert image.getpixel((16, 16))[0] > 150
    assert (
        samples_by_key(tmp_path / "out-cartoonset10k").keys()
        == samples_by_key(tmp_path / "out-cartoonset10k.tgz").keys()
    )


def test_cartoon_csv_parser_rejects_bad_rows():
    assert parse_cartoon_csv(b'"eye_angle", 1, 3\n"hair", 0, 111\n') == (
        {"eye_angle": 1, "hair": 0},
        {"eye_angle": 3, "hair": 111},
    )
    for bad in (b'"eye_angle", 3, 3\n', b'"eye_angle", 1\n', b"", b'"eye_angle", x, 3\n'):
        with pytest.raises(ValueError):
            parse_cartoon_csv(bad)


def test_folder_of_any_images(tmp_path):
    src = tmp_path / "mine"
    (src / "a" / "b.c").mkdir(parents=True)
    (src / "a" / "b.c" / "face.one.png").write_bytes(photo(1, 64))
    Image.open(io.BytesIO(photo(2, 64))).save(src / "wide.jpg", quality=95)
    Image.open(io.BytesIO(photo(3, 64))).resize((96, 48)).save(src / "pano.png")
    (src / "tiny.png").write_bytes(photo(4, 16))
    (src / "notes.txt").write_text("hello")
    for index in range(6):
        (src / "more" / f"{index}.png").parent.mkdir(exist_ok=True)
        (src / "more" / f"{index}.png").write_bytes(photo(10 + index, 40))
    manifest = convert(
        folder_source(src), tmp_path / "out", ConvertOptions(size=32, shard_size=10), workers=1, progress=False
    )
    samples = samples_by_key(tmp_path / "out")
    assert sorted(samples) == ["a_b_c_face_one", *[f"more_{i}" for i in range(6)], "pano", "wide"]
    assert manifest["skipped"][0]["file"] == "tiny.png" and "upscaling" in manifest["skipped"][0]["reason"]
    assert manifest["source"]["ignored_files"] == 1
    with Image.open(io.BytesIO(samples["pano"]["png"])) as image:
        assert image.size == (32, 32)
    upscaled = convert(
        folder_source(src),
        tmp_path / "up",
        ConvertOptions(size=32, shard_size=10, allow_upscale=True),
        workers=1,
        progress=False,
    )
    assert upscaled["num_samples"] == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["ffhq", "--src", "{empty}", "--size", "64"], "no FFHQ here"),
        (["ffhq", "--src", "{nowhere}", "--size", "64"], "no such file or folder"),
        (["ffhq", "--src", "{thumbs}", "--size", "256"], "only thumbnails128x128 found"),
        (
            ["ffhq", "--src", "{ffhq}", "--size", "32", "--split", "official", "--val-fraction", "2"],
            "--val-fraction 2.0",
        ),
        (["cartoonset", "--src", "{empty}", "--size", "64"], "no Cartoon Set images here"),
        (["folder", "--src", "{notes}", "--size", "64"], "not a .zip, .tar or .tgz"),
        (["folder", "--src", "{ffhq}", "--size", "32", "--out", "{full}"], "is not empty"),
    ],
)
def test_bad_input_is_one_line(ffhq_root, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "thumbs" / "thumbnails128x128").mkdir(parents=True)
    (tmp_path / "thumbs" / "thumbnails128x128" / "00000.png").write_bytes(photo(0, 32))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious.txt").write_text("keep me")
    places = {
        "empty": tmp_path / "empty",
        "nowhere": tmp_path / "nowhere",
        "thumbs": tmp_path / "thumbs",
        "ffhq": ffhq_root,
        "notes": tmp_path / "notes.txt",
        "full": tmp_path / "full",
    }
    args = [a.format(**places) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = facegen("data", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert (tmp_path / "full" / "precious.txt").read_text() == "keep me"


def test_rerun_with_other_options_is_refused(ffhq_root, tmp_path):
    out = tmp_path / "out"
    convert(ffhq_source(ffhq_root, 16), out, ConvertOptions(size=16, shard_size=8), workers=1, progress=False)
    with pytest.raises(DataError, match="other options"):
        convert(ffhq_source(ffhq_root, 24), out, ConvertOptions(size=24, shard_size=8), workers=1, progress=False)
    assert (
        convert(ffhq_source(ffhq_root, 16), out, ConvertOptions(size=16, shard_size=8), workers=1, progress=False)[
            "num_samples"
        ]
        == 38
    )


@pytest.mark.slow
def test_two_processes_train_on_converted_cartoonset(tmp_path):
    root = make_cartoonset(tmp_path / "src", num=60)
    out = tmp_path / "shards"
    assert (
        facegen(
            "data", "cartoonset", "--src", str(root), "--out", str(out), "--size", "32", "--shard-size", "7"
        ).returncode
        == 0
    )
    result = run_train(
        tmp_path, *TINY, f"data.path={out}", "run.name=cartoon", "train.total_images=64", num_processes=2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "runs" / "cartoon")
    assert rows and all(row["world_size"] == 2 for row in rows) and rows[-1]["images_seen"] == 64
    assert json.loads((tmp_path / "runs" / "cartoon" / "summary.json").read_text())["ranks_in_sync"]
    assert all(np.isfinite(row["loss"]) for row in rows)
