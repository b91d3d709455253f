import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch

from facegen_dist.data.make_avatars import make_avatar_dataset
from facegen_dist.data.pipeline import ShardSchedule, StreamSpec, make_train_loader, read_images
from facegen_dist.data.shards import iter_shard_samples, read_manifest, split_shards, verify_shards
from facegen_dist.errors import DataError


def _batches(shards, num, **kwargs):
    spec = StreamSpec(
        tuple(shards), resolution=32, batch_size=kwargs.pop("batch_size", 8), seed=kwargs.pop("seed", 1), **kwargs
    )
    return list(itertools.islice(make_train_loader(spec), num))


def test_dataset_is_deterministic_for_a_seed(tmp_path):
    first = make_avatar_dataset(
        tmp_path / "a", num=40, size=32, seed=7, samples_per_shard=16, workers=2, progress=False
    )
    again = make_avatar_dataset(
        tmp_path / "b", num=40, size=32, seed=7, samples_per_shard=16, workers=1, progress=False
    )
    other = make_avatar_dataset(
        tmp_path / "c", num=40, size=32, seed=8, samples_per_shard=16, workers=2, progress=False
    )

    def checksums(m):
        return [s["sha256"] for split in ("train", "val") for s in m["splits"][split]["shards"]]

    assert checksums(first) == checksums(again)  # byte-identical shards, whatever the worker count
    assert checksums(first) != checksums(other)


def test_manifest_counts_match_shard_contents(tiny_shards):
    manifest = read_manifest(tiny_shards)
    assert manifest["num_samples"] == 380
    total = 0
    for split, info in manifest["splits"].items():
        counted = 0
        for entry in info["shards"]:
            samples = list(iter_shard_samples(str(tiny_shards / entry["file"])))
            assert len(samples) == entry["num_samples"]
            assert all({"png", "json"} <= set(s) for s in samples)
            counted += len(samples)
        assert counted == info["num_samples"]
        total += counted
    assert total == 380
    assert len(manifest["splits"]["train"]["shards"]) == 7  # odd on purpose (2-rank tests)
    attributes = json.loads(next(iter_shard_samples(str(tiny_shards / "val-000000.tar")))["json"])
    assert set(attributes) == set(manifest["attributes"])
    assert all(attributes[name] in manifest["attributes"][name] for name in attributes)


def test_images_are_square_rgb_at_requested_size(tiny_shards):
    images, attributes = read_images(split_shards(tiny_shards, "val"), 5, resolution=32)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert len(attributes) == 5 and "hair_color" in attributes[0]
    assert images.float().std() > 10  # not blank


def test_make_refuses_to_overwrite(tmp_path):
    make_avatar_dataset(tmp_path / "a", num=4, size=16, progress=False, workers=1)
    with pytest.raises(DataError, match="already holds a dataset"):
        make_avatar_dataset(tmp_path / "a", num=4, size=16, progress=False, workers=1)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("start", [1, 5])
def test_stream_resumes_exactly_from_any_batch(tiny_shards, workers, start):
    shards = split_shards(tiny_shards, "train")
    full = _batches(shards, 12, num_workers=workers, rank=1, world_size=2, shuffle_group=2)
    resumed = _batches(
        shards, 12 - start, num_workers=workers, rank=1, world_size=2, shuffle_group=2, start_batch=start
    )
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[start:], resumed))


def test_stream_differs_across_ranks_and_seeds(tiny_shards):
    shards = split_shards(tiny_shards, "train")
    rank0 = _batches(shards, 2, rank=0, world_size=2)
    rank1 = _batches(shards, 2, rank=1, world_size=2)
    other_seed = _batches(shards, 2, rank=0, world_size=2, seed=2)
    assert not torch.equal(rank0[0]["image"], rank1[0]["image"])
    assert not torch.equal(rank0[0]["image"], other_seed[0]["image"])


def test_slots_read_disjoint_shards_within_a_pass():
    counts = [10] * 8
    groups = [ShardSchedule(counts, seed=3, slot=s, num_slots=4, shuffle_group=2).group(0) for s in range(4)]
    flat = [shard for group in groups for shard in group]
    assert sorted(flat) == list(range(8))


def test_stream_never_runs_dry(tiny_shards):
    """More batches than one pass holds: the stream goes on (ranks never get fewer batches)."""
    shards = split_shards(tiny_shards, "train")
    batches = _batches(shards, 60, batch_size=16, rank=0, world_size=2)  # 960 samples > 342
    assert len(batches) == 60 and all(b["image"].shape[0] == 16 for b in batches)


def test_truncated_tar_is_reported_and_skipped(tiny_shards, tmp_path, capfd):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_shards, damaged)
    victim = damaged / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    shards = split_shards(damaged, "train")
    batches = _batches(shards, 50, rank=0, world_size=1, shuffle_group=7)  # 400 samples: reads every shard
    assert all(b["image"].shape == (8, 3, 32, 32) for b in batches)
    assert sum(b["bad_samples"] for b in batches) > 0
    assert "train-000002.tar" in capfd.readouterr().err
    assert any("train-000002.tar" in problem for problem in verify_shards(damaged))


def test_corrupt_image_is_replaced_and_counted(tmp_path):
    from facegen_dist.data.shards import ShardWriter, write_manifest

    writer = ShardWriter(tmp_path, "train", 10)
    good = make_avatar_dataset(tmp_path / "src", num=10, size=16, progress=False, workers=1)
    sources = list(iter_shard_samples(str(tmp_path / "src" / good["splits"]["train"]["shards"][0]["file"])))
    for index, sample in enumerate(sources):
        writer.write(f"{index:04d}", {"png": b"not an image" if index == 3 else sample["png"], "json": sample["json"]})
    writer.close()
    write_manifest(tmp_path, {"splits": {"train": {"num_samples": 9, "shards": writer.shards}}})
    batches = _batches(split_shards(tmp_path, "train"), 9, batch_size=1, rank=0, world_size=1, shuffle_group=1)
    assert sum(b["bad_samples"] for b in batches) == 1
    assert all(b["image"].float().std() > 0 for b in batches)


def test_cli_makes_and_verifies_a_dataset(tmp_path):
    out = tmp_path / "cli"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "facegen_dist.cli",
            "data",
            "avatars",
            "--out",
            str(out),
            "--num",
            "30",
            "--size",
            "16",
            "--shard-size",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    assert "train 27 in 3 shards" in made.stdout and "avatars" in made.stderr  # progress bar on stderr
    checked = subprocess.run(
        [sys.executable, "-m", "facegen_dist.cli", "data", "verify", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0 and "all shards match" in checked.stdout
    (out / "train-000001.tar").unlink()
    checked = subprocess.run(
        [sys.executable, "-m", "facegen_dist.cli", "data", "verify", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode != 0 and "train-000001.tar: missing" in checked.stderr
    again = subprocess.run(
        [sys.executable, "-m", "facegen_dist.cli", "data", "avatars", "--out", str(out), "--num", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already holds a dataset" in again.stderr


def test_attribute_vocabulary_has_no_duplicates(tiny_shards):
    for name, values in read_manifest(tiny_shards)["attributes"].items():
        assert len(values) == len(set(values)), name
