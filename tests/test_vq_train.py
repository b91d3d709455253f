"""The VQ family end to end with real processes: 2-rank VQ-VAE2 training, code extraction with 1 and 2
processes, then the PixelCNN prior stage on the code shards (train, kill -9 and resume exactly, sample a
PNG grid with 1 and 2 processes) and on images (codes computed on the fly)."""

import json

import numpy as np
import pytest
from helpers import COMMON, TINY_VQVAE2, kill9_after_first_checkpoint, read_metrics, run_facegen, run_train, start_train
from PIL import Image

pytestmark = pytest.mark.slow


def _assert_ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    )


@pytest.fixture(scope="module")
def vq_root(tmp_path_factory, tiny_shards):
    """runs/vq: a tiny VQ-VAE2 trained by two processes for 1280 images."""
    root = tmp_path_factory.mktemp("vq")
    result = run_train(
        root,
        *TINY_VQVAE2,
        f"data.path={tiny_shards}",
        "run.name=vq",
        "train.total_images=1280",
        "train.log_every_images=160",
        "train.ckpt_every_images=640",
        "train.sample_every_images=640",
        num_processes=2,
    )
    _assert_ok(result)
    return root


def test_two_process_vqvae2_codebooks_identical_usage_healthy_loss_falls(vq_root):
    run_dir = vq_root / "runs" / "vq"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 80
    # The codebooks are Parameters (frozen under the EMA rule), so the per-rank checksums cover them.
    assert len(summary["parameter_checksums"]) == 2 and summary["ranks_in_sync"], summary["parameter_checksums"]
    rows = read_metrics(run_dir)
    assert all(row["world_size"] == 2 for row in rows)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [round(r["loss"], 4) for r in rows]
    for level in ("top", "bottom"):
        assert rows[-1][f"codebook_{level}/used_frac"] > 0.5, rows[-1]
        assert rows[-1][f"codebook_{level}/perplexity"] > 4, rows[-1]
    assert (run_dir / "samples" / "reconstructions_final.png").is_file()
    assert (run_dir / "samples" / "codebook_usage_final.png").is_file()
    assert not (run_dir / "samples" / "samples_final.png").exists()  # a VQ run has no prior to sample from yet


@pytest.fixture(scope="module")
def code_shards(vq_root):
    """`facegen codes` of runs/vq by one process and by two: {1: folder, 2: folder}."""
    folders = {}
    for processes in (1, 2):
        folders[processes] = vq_root / f"codes{processes}"
        result = run_facegen(
            vq_root,
            "codes",
            "--run",
            "runs/vq",
            "--out",
            str(folders[processes]),
            "--batch-size",
            "16",
            num_processes=processes,
        )
        _assert_ok(result)
    return folders


def test_code_extraction_is_the_same_for_one_and_two_processes_and_matches_the_encoder(
    code_shards, vq_root, tiny_shards
):
    import torch

    from facegen_dist.data.codecs import decode_npy
    from facegen_dist.data.pipeline import read_images
    from facegen_dist.data.shards import iter_shard_samples, read_manifest, split_shards
    from facegen_dist.runs import restore_run

    manifests = {p: read_manifest(folder) for p, folder in code_shards.items()}
    assert manifests[1]["splits"] == manifests[2]["splits"]  # same shard files, counts and sha256
    source = read_manifest(tiny_shards)
    for split in ("train", "val"):
        assert manifests[1]["splits"][split]["num_samples"] == source["splits"][split]["num_samples"]
        assert [e["file"] for e in manifests[1]["splits"][split]["shards"]] == [
            e["file"] for e in source["splits"][split]["shards"]
        ]
    assert manifests[1]["kind"] == "vq-codes" and manifests[1]["levels"] == {"top": [4, 4], "bottom": [8, 8]}
    assert manifests[1]["vq_checkpoint"] == "ckpt-000000001280"
    # The codes are the VQ-VAE2's (EMA) encoding of the images, in shard order.
    restored = restore_run(vq_root / "runs" / "vq")
    images = read_images(split_shards(tiny_shards, "val"), 5, 32)[0].float() / 255
    with torch.no_grad():
        _, expected, _, _ = restored.modules["vqvae"].encode(images)
    samples = list(iter_shard_samples(str(code_shards[2] / "val-000000.tar")))[:5]
    for level in ("top", "bottom"):
        got = torch.from_numpy(np.stack([decode_npy(s[f"{level}.npy"]) for s in samples])).long()
        assert torch.equal(got, expected[level])


def test_code_shards_train_only_their_own_prior(code_shards, vq_root, tmp_path):
    base = [*COMMON, f"data.path={code_shards[1]}", "train.total_images=16"]
    result = run_train(tmp_path, *base, "model.name=vae")
    assert result.returncode == 2 and "holds VQ codes" in result.stderr and "Traceback" not in result.stderr
    result = run_train(
        tmp_path,
        *base,
        "model.name=pixelcnn_prior",
        f"model.vq_run={vq_root / 'runs' / 'vq'}",
        "model.vq_checkpoint=ckpt-000000000640",
    )
    assert (
        result.returncode == 2
        and "set model.vq_checkpoint=ckpt-000000001280" in result.stderr
        and "Traceback" not in result.stderr
    )


def _prior_args(name, vq_root, data):
    # Every step logged (8 images x 2 ranks) so that per-step losses can be compared exactly.
    return [
        *COMMON,
        "model.name=pixelcnn_prior",
        f"model.vq_run={vq_root / 'runs' / 'vq'}",
        "model.channels=16",
        "model.layers=3",
        "model.kernel_size=3",
        f"data.path={data}",
        f"run.name={name}",
        "train.total_images=1920",
        "train.log_every_images=16",
        "train.ckpt_every_images=320",
        "train.sample_every_images=100000",
        "optim.lr=2e-3",
        "optim.warmup_images=160",
        "optim.schedule=cosine",
    ]


def test_prior_on_code_shards_trains_resumes_exactly_after_kill9_and_samples(vq_root, code_shards, tmp_path):
    codes = code_shards[2]
    reference = run_train(tmp_path, *_prior_args("reference", vq_root, codes), num_processes=2)
    _assert_ok(reference)

    crashed_dir = tmp_path / "runs" / "crashed"
    kill9_after_first_checkpoint(start_train(tmp_path, *_prior_args("crashed", vq_root, codes)), crashed_dir)
    assert not (crashed_dir / "summary.json").exists()
    resumed = run_train(tmp_path, *_prior_args("crashed", vq_root, codes), num_processes=2)
    _assert_ok(resumed)
    assert "resumed from" in resumed.stderr

    expected, got = read_metrics(tmp_path / "runs" / "reference"), read_metrics(crashed_dir)
    assert [row["step"] for row in got] == list(range(1, 121))
    for want, have in zip(expected, got):
        for key in ("prior_top/nll", "prior_bottom/nll", "grad_norm/prior_top", "grad_norm/prior_bottom", "lr"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    assert expected[-1]["prior_bottom/nll"] < expected[0]["prior_bottom/nll"]
    final = [json.loads((tmp_path / "runs" / name / "summary.json").read_text()) for name in ("reference", "crashed")]
    assert final[0]["parameter_checksums"] == final[1]["parameter_checksums"] and final[0]["ranks_in_sync"]

    # Sampling: the same grid from 1 and 2 processes (fixed chunks, per-chunk seeds).
    grids = {}
    for processes in (1, 2):
        out = tmp_path / f"grid{processes}.png"
        result = run_facegen(
            tmp_path,
            "sample",
            "--run",
            "runs/reference",
            "--num",
            "6",
            "--batch-size",
            "2",
            "--out",
            str(out),
            num_processes=processes,
        )
        _assert_ok(result)
        grids[processes] = out.read_bytes()
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["processes"] == processes and record["num"] == 6 and record["seconds_per_image"] > 0
        assert record["protocol"]["vq_run"].endswith("vq")
    with Image.open(tmp_path / "grid1.png") as image:
        assert image.size == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)  # 6 samples, 2 per row, 2 px padding
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not a blank image
    assert grids[1] == grids[2]


def test_sampling_a_vq_run_or_a_missing_run_is_one_line(vq_root, tmp_path):
    result = run_facegen(vq_root, "sample", "--run", "runs/vq", "--num", "4", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("facegen: error")]
    assert len(lines) == 1 and "pixelcnn_prior" in lines[0] and "Traceback" not in result.stderr
    result = run_facegen(vq_root, "sample", "--run", "runs/nothing", "--num", "4", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "not a run folder" in result.stderr and "Traceback" not in result.stderr


def test_prior_on_a_non_vq_run_is_one_line(trained_run, tiny_shards, tmp_path):
    result = run_train(
        tmp_path,
        *COMMON,
        "model.name=pixelcnn_prior",
        f"model.vq_run={trained_run / 'runs' / 'tiny'}",
        f"data.path={tiny_shards}",
        "train.total_images=16",
    )
    assert result.returncode == 2
    assert "is a 'vae' run, not vqvae/vqvae2" in result.stderr and "Traceback" not in result.stderr


def test_in_training_fid_on_a_run_that_cannot_sample_stops_at_start(tiny_shards, tmp_path):
    result = run_train(
        tmp_path, *TINY_VQVAE2, f"data.path={tiny_shards}", "train.total_images=64", "eval.every_images=32"
    )
    assert result.returncode == 2
    assert "need samples and a 'vqvae2' run draws none" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("runs/*/checkpoints"))


def test_prior_pins_a_named_vq_checkpoint_and_a_wrong_name_is_one_line(vq_root, tiny_shards, tmp_path):
    args = [
        *COMMON,
        "model.name=pixelcnn_prior",
        f"model.vq_run={vq_root / 'runs' / 'vq'}",
        f"data.path={tiny_shards}",
        "model.channels=8",
        "model.layers=2",
        "model.kernel_size=3",
        "train.total_images=16",
        "run.name=pinned",
    ]
    result = run_train(tmp_path, *args, "model.vq_checkpoint=ckpt-000000000640")
    _assert_ok(result)
    record = run_facegen(
        tmp_path, "sample", "--run", "runs/pinned", "--num", "2", "--batch-size", "2", "--out", str(tmp_path / "g.png")
    )
    _assert_ok(record)
    assert json.loads((tmp_path / "g.json").read_text())["protocol"]["vq_checkpoint"] == "ckpt-000000000640"
    result = run_train(tmp_path, *args, "model.vq_checkpoint=ckpt-999", "run.name=wrong")
    assert (
        result.returncode == 2
        and "model.vq_run:" in result.stderr
        and "ckpt-999" in result.stderr
        and "Traceback" not in result.stderr
    )
