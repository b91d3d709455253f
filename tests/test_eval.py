"""Evaluation: metric sanity, the full `facegen eval` path with 1 and 2 processes, reference caching, offline errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import EVAL_TINY, TINY, run_facegen, run_train

from facegen_dist.eval.metrics import (
    compute_feature_metric,
    feature_statistics,
    laplacian_energy,
    psnr,
    sharpness,
    ssim,
    value_names,
)

sys.path.insert(0, str(Path(__file__).parent / "plugins"))

EVAL = EVAL_TINY


def test_fid_of_a_set_with_itself_is_zero_and_a_shifted_set_is_far():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=generator)
    same = compute_feature_metric("fid", features, None, feature_statistics(features), seed=0)[
        "frechet_inception_distance"
    ]
    shifted = compute_feature_metric("fid", features + 1.0, None, feature_statistics(features), seed=0)[
        "frechet_inception_distance"
    ]
    assert abs(same) < 1e-6
    assert shifted == pytest.approx(16.0, rel=0.05)  # |mean shift|^2 = 16 x 1^2, same covariance


def test_kid_and_precision_recall_are_finite_and_in_range():
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 8, generator=generator), torch.randn(300, 8, generator=generator) * 1.5
    kid = compute_feature_metric("kid", fake, real, None, seed=0)
    prc = compute_feature_metric("prc", fake, real, None, seed=0)
    assert (
        torch.isfinite(torch.tensor(kid["kernel_inception_distance_mean"]))
        and kid["kernel_inception_distance_mean"] > 0
    )
    assert 0 <= prc["precision"] <= 1 and 0 <= prc["recall"] <= 1
    same = compute_feature_metric("prc", real, real, None, seed=0)
    assert same["precision"] == 1.0 and same["recall"] == 1.0


def test_psnr_and_ssim():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert torch.allclose(ssim(images, images), torch.ones(4))
    noisier = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert (ssim(noisier, images) < ssim(noisy, images)).all() and (ssim(noisy, images) < 1).all()
    # Constant images: no variance, so SSIM = (2*a*b + c1) / (a^2 + b^2 + c1), by hand.
    a, b, c1 = 0.5, 0.6, 0.01**2
    flat_a, flat_b = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert ssim(flat_a, flat_b).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    assert (psnr(images, images) > 90).all()
    expected = 10 * torch.log10(1 / (noisy - images).pow(2).flatten(1).mean(1))
    assert torch.allclose(psnr(noisy, images), expected)


def test_sharpness_is_one_for_the_data_below_for_blur_above_for_noise():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    energy = laplacian_energy(images)
    assert sharpness(laplacian_energy(images), energy) == pytest.approx(1.0)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    assert sharpness(laplacian_energy(blurred), energy) < 0.3 < 1.0 < sharpness(laplacian_energy(noisy), energy)
    # By hand: a grey image with one white pixel in the middle: Laplacian -4 there, +1 at its 4 neighbours.
    dot = torch.zeros(1, 3, 5, 5)
    dot[..., 2, 2] = 1.0
    assert laplacian_energy(dot).item() == pytest.approx((16 + 4) / 9)  # 'valid' 3x3 window: 9 outputs
    assert laplacian_energy(torch.full((2, 3, 8, 8), 0.7)).abs().max().item() < 1e-9  # flat: no detail


def test_names_carry_a_non_inception_extractor():
    assert value_names("fid", "inception-v3-compat") == {"frechet_inception_distance": "fid"}
    assert value_names("fid", "avatar-v1") == {"frechet_inception_distance": "fd_avatar"}
    assert value_names("prc", "avatar-v1")["precision"] == "precision_avatar"
    assert value_names("kid", "tiny-test")["kernel_inception_distance_mean"] == "kid_tiny-test"


def _eval(root, *args, num_processes=1):
    return run_facegen(
        root,
        "eval",
        "--run",
        "runs/tiny",
        *EVAL,
        f"eval.cache_dir={root / 'cache'}",
        *args,
        num_processes=num_processes,
    )


@pytest.fixture(scope="module")
def one_and_two_process_eval(trained_run):
    """The same evaluation by 1 and then 2 processes: both records, the reference cache before/after, the history."""
    metrics = "--metrics=fid,kid,prc,rfid,psnr,ssim,sharpness"
    eval_dir = trained_run / "runs" / "tiny" / "eval"
    one = _eval(trained_run, metrics, "--num", "48")
    assert one.returncode == 0, one.stderr[-3000:]
    record_one = json.loads(sorted(eval_dir.glob("0*.json"))[-1].read_text())
    cache_files = list((trained_run / "cache").glob("ref-*.pt"))
    mtime = cache_files[0].stat().st_mtime_ns if len(cache_files) == 1 else None
    two = _eval(trained_run, metrics, "--num", "48", num_processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    return {
        "one": record_one,
        "two": json.loads(sorted(eval_dir.glob("0*.json"))[-1].read_text()),
        "cache_files": cache_files,
        "mtime_before": mtime,
        "mtime_after": cache_files[0].stat().st_mtime_ns if cache_files else None,
        "history": [json.loads(line) for line in (eval_dir / "history.jsonl").read_text().splitlines()],
    }


@pytest.mark.slow
def test_eval_gives_the_same_values_on_one_and_two_processes(one_and_two_process_eval):
    one, two = one_and_two_process_eval["one"], one_and_two_process_eval["two"]
    assert two["protocol"]["world_size"] == 2 and one["protocol"]["world_size"] == 1
    assert one["metrics"].keys() == two["metrics"].keys()
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


@pytest.mark.slow
def test_eval_computes_the_reference_once_and_reads_it_from_the_cache_after(one_and_two_process_eval):
    evaluated = one_and_two_process_eval
    assert len(evaluated["cache_files"]) == 1 and evaluated["one"]["protocol"]["reference"]["computed"] is True
    assert evaluated["two"]["protocol"]["reference"]["computed"] is False
    assert evaluated["mtime_after"] == evaluated["mtime_before"]


@pytest.mark.slow
def test_eval_values_are_in_their_ranges(one_and_two_process_eval):
    values = one_and_two_process_eval["one"]["metrics"]
    names = {"fd_tiny-test", "kid_tiny-test", "precision_tiny-test", "recall_tiny-test", "rfd_tiny-test"}
    assert names | {"psnr", "ssim", "sharpness"} <= set(values)
    assert values["fd_tiny-test"] > 0 and 0 <= values["precision_tiny-test"] <= 1
    assert 5 < values["psnr"] < 60 and 0 < values["ssim"] <= 1
    assert 0 < values["sharpness"] < 1  # a VAE 320 images in reconstructs a blur of its inputs


@pytest.mark.slow
def test_eval_record_carries_its_full_protocol(one_and_two_process_eval):
    protocol = one_and_two_process_eval["one"]["protocol"]
    assert protocol["extractor"]["name"] == "tiny-test" and len(protocol["extractor"]["weights_sha256"]) == 64
    assert protocol["model"]["images_seen"] == 320 and protocol["model"]["ema"] is True
    assert protocol["num_generated"] == 48 and protocol["num_reference"] == 38  # the val split has 38 images
    assert len(protocol["reference"]["dataset_manifest_sha256"]) == 64 and protocol["reference"]["split"] == "val"
    assert protocol["seed"] == 1234 and "z ~ N(0, I)" in protocol["sampling"]["latent"]


@pytest.mark.slow
def test_eval_appends_each_record_to_the_history(one_and_two_process_eval):
    ours = [
        r
        for r in one_and_two_process_eval["history"]
        if r["protocol"].get("extractor", {}).get("name") == "tiny-test" and r["protocol"]["num_generated"] == 48
    ]
    assert [r["protocol"]["world_size"] for r in ours] == [1, 2]


def test_eval_without_inception_weights_offline_fails_in_one_line(trained_run, tmp_path, monkeypatch):
    result = run_facegen(
        trained_run,
        "eval",
        "--run",
        "runs/tiny",
        "--metrics=fid",
        "--extractor=inception-v3-compat",
        "eval.allow_download=false",
        f"eval.cache_dir={tmp_path}",
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Inception weights" in lines[0] and "eval.inception_weights=PATH" in lines[0], (
        result.stderr
    )


def test_eval_bad_input_is_one_line(trained_run, tmp_path):
    for args, expected in [
        (["--run", str(tmp_path)], "not a run folder"),
        (["--run", "runs/tiny", "--metrics=fid,bogus"], "eval.metrics: unknown ['bogus']"),
    ]:
        result = run_facegen(trained_run, "eval", *args, *EVAL)
        assert result.returncode != 0 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_in_training_evaluation_is_logged_with_protocol(tmp_path, tiny_shards):
    result = run_train(
        tmp_path,
        *TINY,
        f"data.path={tiny_shards}",
        "run.name=evaltrain",
        "train.total_images=320",
        "train.log_every_images=320",
        "eval.every_images=160",
        "eval.during_training_num=32",
        "eval.metrics=[fid,psnr]",
        *EVAL,
        f"eval.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "evaltrain" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "eval/fd_tiny-test" in row]
    assert [row["images_seen"] for row in evaluated] == [160, 320]
    assert all(row["eval/fd_tiny-test"] > 0 and row["eval/psnr"] > 5 for row in evaluated)
    records = [
        json.loads(line)
        for line in (tmp_path / "runs" / "evaltrain" / "eval" / "history.jsonl").read_text().splitlines()
    ]
    assert [r["protocol"]["model"]["images_seen"] for r in records] == [160, 320]
    assert (
        records[0]["protocol"]["model"]["checkpoint"] == "in-training"
        and records[1]["protocol"]["reference"]["computed"] is False
    )


def test_training_with_eval_but_no_weights_stops_at_start(tmp_path, tiny_shards):
    result = run_train(
        tmp_path,
        *TINY,
        f"data.path={tiny_shards}",
        "eval.every_images=160",
        "eval.extractor=inception-v3-compat",
        "eval.allow_download=false",
        f"eval.cache_dir={tmp_path}",
    )
    assert result.returncode != 0 and "Inception weights" in result.stderr and "Traceback" not in result.stderr
    assert (
        not list((tmp_path / "runs").glob("*/metrics.jsonl"))
        or not (tmp_path / "runs" / "vae_avatars64" / "metrics.jsonl").read_text()
    )
