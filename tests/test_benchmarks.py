"""The benchmark scripts run end to end with tiny settings (their figures are not checked, only that they are sane)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=600)


def test_data_benchmark_smoke(tmp_path):
    out = tmp_path / "data.json"
    result = run_script("data.py", "--smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = {(row["content"], row["size"], row["format"]): row for row in report["rows"]}
    expected = {
        (content, 32, fmt) for content in ("avatar", "photo-like") for fmt in ("jpg", "png", "webp", "webp-lossless")
    }
    assert set(cells) == expected
    for cell, row in cells.items():
        for key in ("bytes_per_image", "encode_ms_per_image", "decode_augment_images_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (cell, key, row[key])
    assert {"date", "commit", "cpu", "versions", "command"} <= set(report["header"])
    assert "| photo-like | 32 | webp-lossless |" in result.stdout


def test_pixelcnn_sampling_benchmark_smoke():
    result = run_script(
        "pixelcnn_sampling.py",
        "--channels",
        "8",
        "--layers",
        "2",
        "--num-codes",
        "16",
        "--grid",
        "4",
        "--num",
        "2",
        "--repeats",
        "1",
        "--compare-naive",
        "--naive-grid",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 4x4 |"))
    assert row.rstrip().endswith("| yes |"), row  # the fast sampler returns the naive loop's codes


def test_gpt_sampling_benchmark_smoke():
    result = run_script("gpt_sampling.py", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 4x4 |"))
    assert row.rstrip().endswith("| yes |"), row  # the cached sampler returns the uncached loop's codes


def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    result = run_script("memory.py", "--smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(row["model"], row["levers"]): row for row in report["rows"]}
    assert {model for model, _ in rows} == {"VAE 32", "VQ-VAE2 32", "VQ-GAN 32"}
    for row in rows.values():
        assert row["activation_mb_per_image"] > 0 and row["estimate_gb"]["ddp"] > 0
        # ZeRO shards states, never adds; DeepSpeed columns are n/a for the two-optimizer VQ-GAN only.
        if row["model"] == "VQ-GAN 32":
            assert row["estimate_gb"]["zero2"] is None
        else:
            assert (
                row["estimate_gb"]["zero3_offload"]
                <= row["estimate_gb"]["zero2"]
                <= row["estimate_gb"]["zero1"]
                <= row["estimate_gb"]["ddp"]
            )
    # The levers do what they claim on the model that has checkpointable blocks.
    fp32, bf16 = rows[("VQ-GAN 32", "naive (fp32, NCHW, for-loop AdamW)")], rows[("VQ-GAN 32", "bf16")]
    checkpointed = rows[("VQ-GAN 32", "act. ckpt")]
    assert bf16["activation_mb_per_image"] < fp32["activation_mb_per_image"]
    assert checkpointed["activation_mb_per_image"] < fp32["activation_mb_per_image"]
    assert ("VAE 32", "act. ckpt") not in rows  # BatchNorm model: no checkpointable blocks, no row
    assert {"date", "commit", "device", "command"} <= set(report["header"])


def test_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("throughput.py", "--smoke", "--comm", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(row["config"], row["loop"].split(" ")[0]) for row in report["rows"]] == [
        ("vae_avatars64", "naive"),
        ("vae_avatars64", "channels_last"),
        ("vqgan_avatars64", "naive"),
        ("vqgan_avatars64", "channels_last"),
    ]
    for row in report["rows"]:
        for key in ("img_per_s", "ratio_to_naive", "gflop_per_image", "mfu", "loader_img_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["config"], key, row[key])
        assert set(row["split"]) == {"data wait", "forward", "backward", "optimizer"}
        assert math.isclose(sum(row["split"].values()), 1.0, rel_tol=1e-6)
    # A GAN step is two phases: more FLOPs per image than its autoencoder's forward + backward alone.
    assert report["rows"][2]["gflop_per_image"] > report["rows"][0]["gflop_per_image"]
    assert report["allreduce"]["backend"] == "gloo" and set(report["allreduce"]["seconds"]) == {
        "vae_avatars64",
        "vqgan_avatars64",
    }
    assert "All-reduce of one step's gradients" in result.stdout


def test_strategies_benchmark_smoke(tmp_path):
    out = tmp_path / "strategies.json"
    result = run_script("strategies.py", "--smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    cells = {(c["method"], c["strategy_config"]): c for c in json.loads(out.read_text())["cells"]}
    assert set(cells) == {("VAE", "ddp"), ("VAE", "ds_zero2"), ("DCGAN", "ddp"), ("DCGAN", "ds_zero2")}
    for key in (("VAE", "ddp"), ("VAE", "ds_zero2"), ("DCGAN", "ddp")):
        assert cells[key]["works"] and cells[key]["ranks_in_sync"] and cells[key]["world_size"] == 2, cells[key]
        assert cells[key]["img_per_s"] > 0 and cells[key]["peak_mem_gb"] > 0
    assert cells[("VAE", "ds_zero2")]["strategy"] == "deepspeed-zero2"
    assert not cells[("DCGAN", "ds_zero2")]["works"] and "2 optimizers" in cells[("DCGAN", "ds_zero2")]["reason"]
    assert "| DCGAN | works:" in result.stdout


def test_memory_search_finds_the_largest_fitting_micro_batch(monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    import memory

    class FakeSetup:  # a card where 5 images fit and 6 do not
        @staticmethod
        def inputs(images):
            return images

    monkeypatch.setattr(
        memory, "measured_peak_gb", lambda setup, images: "OOM" if images.shape[0] > 5 else 0.5 * images.shape[0]
    )
    for measured in ({1: 0.5, 2: 1.0, 4: 2.0, 8: "OOM"}, {1: 0.5}, {}, {2: 1.0, 4: 2.0}):
        assert memory.largest_fitting_batch(FakeSetup(), 8, dict(measured), limit=64) == 5, measured
    assert memory.largest_fitting_batch(FakeSetup(), 8, {1: 0.5}, limit=4) == 4  # the limit caps the doubling
    monkeypatch.setattr(memory, "measured_peak_gb", lambda setup, images: "OOM")
    assert memory.largest_fitting_batch(FakeSetup(), 8, {}, limit=64) == 0


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_with_finite_figures(tmp_path):
    """Minutes on 2 busy CPU cores (each stage starts real processes: train.py, memory.py, bench_peers.py)."""
    out = tmp_path / "gpu_check.json"
    # Not the compile stage: inductor's first compile takes minutes on 2 CPU cores; it times the peers stage's
    # project_cell with torch.compile on, which this test runs uncompiled.
    stages_run = ["train_vae", "train_vqgan", "memory", "peers_vqgan", "peers_vqvae2", "eval"]
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_check.py"),
            "--device",
            "cpu",
            "--smoke",
            "--out",
            str(out),
            "--stages",
            *stages_run,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == stages_run
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage.get("error"), stage.get("stderr_tail", "")[-1500:])
        assert all(math.isfinite(value) for value in _numbers(stage)), name
    for name, label in (("train_vae", "vae_bf16"), ("train_vae", "vae_fp16"), ("train_vqgan", "vqgan_bf16")):
        run = stages[name]["runs"][label]
        assert (
            run["ok"] and run["resume_continues"] and run["first"]["losses_finite"] and run["resume"]["losses_finite"]
        )
        assert run["resume"]["steps"] > run["first"]["steps"] > 0 and run["first"]["checkpoint"]
    assert stages["train_vae"]["runs"]["vae_fp16"]["levers"]["precision"] == "fp16"
    assert (
        stages["memory"]["memory"]["rows"][0]["estimate_gb_by_batch"]["2"]
        > stages["memory"]["memory"]["rows"][0]["estimate_gb_by_batch"]["1"]
        > 0
    )
    peers_folder = (BENCHMARKS.parents[1] / "shared" / "peers" / "bench_peers.py").is_file()
    for name in ("peers_vqgan", "peers_vqvae2"):
        for cell in stages[name]["cells"]:
            assert len(cell["project"]) == 2 and cell["project_img_per_s"] > 0 and 0 < cell["project_mfu"] < 1
            assert set(cell["project"][0]["split"]) == {"forward", "backward", "optimizer"}
    rosinality = stages["peers_vqvae2"]["cells"][0]
    assert rosinality["project"][0]["params_m"] == 1.388867  # the peer's exact architecture (top_encoder_channels=64)
    if peers_folder:
        assert len(rosinality["peer_runs"]) == 2 and rosinality["ratio_project_over_peer"] > 0
        assert rosinality["peer_runs"][0]["params_M"] == 1.389
    else:
        assert stages["peers_vqvae2"]["peer_status"].startswith("skipped: no peers folder")
    # taming's loop is too slow for a CPU smoke run: skipped with its reason (or for the missing peers folder first).
    assert stages["peers_vqgan"]["peer_status"].startswith(
        "skipped in --smoke" if peers_folder else "skipped: no peers folder"
    )
    assert all(stages["eval"]["timings_s"][k] > 0 for k in ("generate", "features", "fid", "kid", "prc"))
