"""Training end to end with real processes: 2-rank DDP on gloo, kill -9 + resume, bf16, NaN skipping."""

import json
import math

import pytest
import torch
from helpers import TINY, kill9_after_first_checkpoint, read_metrics, run_train, start_train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _assert_ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    )


def test_two_processes_train_in_sync_and_loss_falls(tmp_path, tiny_shards):
    result = run_train(
        tmp_path,
        *TINY,
        f"data.path={tiny_shards}",
        "run.name=ddp",
        "train.total_images=1920",
        "train.log_every_images=160",
        "train.sample_every_images=960",
        "train.ckpt_every_images=960",
        "train.grad_accum=2",
        "debug.inject_nan_at_steps=[5]",
        num_processes=2,
    )
    _assert_ok(result)
    run_dir = tmp_path / "runs" / "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["parameter_checksums"]) == 2 and summary["ranks_in_sync"]
    # 8 per micro-batch x 2 micro-batches x 2 ranks x 60 steps; 7 shards over 2 ranks
    assert summary["images_seen"] == 1920
    assert summary["steps"] == 60
    assert summary["skipped_steps"] == 1  # NaN on rank 0 only: both ranks skipped that step together
    rows = read_metrics(run_dir)
    assert all(row["world_size"] == 2 for row in rows)
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [round(r["loss"], 2) for r in rows]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "samples" / "reconstructions_final.png").is_file()
    assert (run_dir / "samples" / "samples_final.png").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-000000000960", "ckpt-000000001920"]


def _resume_args(name):
    # Every step logged (8 images x 2 ranks), so per-step losses can be compared exactly.
    return [
        *TINY,
        "model.channels=[16,32,64,64,64]",
        "data.num_workers=2",
        f"run.name={name}",
        "train.total_images=2400",
        "train.log_every_images=16",
        "train.ckpt_every_images=480",
        "train.sample_every_images=100000",
        "optim.schedule=cosine",
        "optim.warmup_images=160",
    ]


def test_kill9_then_rerun_reproduces_uninterrupted_losses(tmp_path, tiny_shards):
    data = f"data.path={tiny_shards}"
    # The reference writes no checkpoint on the way: had saving or resuming touched the trajectory, the runs would differ.
    reference = run_train(
        tmp_path, *_resume_args("reference"), data, "train.ckpt_every_images=1000000", num_processes=2
    )
    _assert_ok(reference)

    crashed_dir = tmp_path / "runs" / "crashed"
    kill9_after_first_checkpoint(start_train(tmp_path, *_resume_args("crashed"), data), crashed_dir)
    assert not (crashed_dir / "summary.json").exists()
    assert read_metrics(crashed_dir)[-1]["step"] < 150

    resumed = run_train(tmp_path, *_resume_args("crashed"), data, num_processes=2)
    _assert_ok(resumed)
    assert "resumed from" in resumed.stderr

    expected, got = read_metrics(tmp_path / "runs" / "reference"), read_metrics(crashed_dir)
    assert [row["step"] for row in got] == list(range(1, 151))  # no step lost or logged twice
    for want, have in zip(expected, got):
        for key in ("loss", "mse", "kl", "lr", "grad_norm/autoencoder", "images_seen"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    final_reference = json.loads((tmp_path / "runs" / "reference" / "summary.json").read_text())
    final_resumed = json.loads((crashed_dir / "summary.json").read_text())
    assert final_reference["parameter_checksums"] == final_resumed["parameter_checksums"]


def test_bf16_nan_skip_wandb_offline_and_rerun_is_noop(tmp_path, tiny_shards):
    # bf16 from the launcher: train.precision=auto (the default) follows `accelerate launch --mixed_precision`.
    args = [
        *TINY,
        f"data.path={tiny_shards}",
        "run.name=bf16",
        "train.total_images=320",
        "train.log_every_images=8",
        "train.ckpt_every_images=160",
        "debug.inject_nan_at_steps=[3]",
        "log.wandb=offline",
    ]
    result = run_train(tmp_path, *args, launcher=True, mixed_precision="bf16")
    _assert_ok(result)
    assert "non-finite loss or gradient at step 3" in result.stderr
    run_dir = tmp_path / "runs" / "bf16"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["mixed_precision"] == "bf16"
    rows = read_metrics(run_dir)
    assert len(rows) == 40 and rows[-1]["skipped_steps"] == 1
    assert all(math.isfinite(value) for row in rows for value in row.values())
    weights = load_file(str(run_dir / "checkpoints" / "ckpt-000000000320" / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run written"

    again = run_train(tmp_path, *args, launcher=True, mixed_precision="bf16")
    _assert_ok(again)
    assert "already complete" in again.stderr
    assert len(read_metrics(run_dir)) == 40


def test_a_launched_process_ends_without_interpreter_teardown_and_keeps_its_output():
    """Under a launcher (WORLD_SIZE > 1) the entry points end with os._exit: gloo's threads cannot abort a finished run."""
    import os
    import subprocess
    import sys

    script = (
        "import atexit, sys\nfrom facegen_dist.cli import exit_process\n"
        "atexit.register(lambda: print('teardown ran'))\nprint('done', end='')\nsys.stderr.write('err')\n"
        "sys.exit(exit_process(3))\n"
    )
    for world_size, teardown in (("2", False), ("1", True)):
        env = {**os.environ, "WORLD_SIZE": world_size}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 3 and result.stderr == "err", result
        assert result.stdout == ("doneteardown ran\n" if teardown else "done")  # buffered output flushed either way


def test_four_processes_resume_exactly_even_between_log_rows(tmp_path, tiny_shards):
    """With 3+ ranks DDP's first step after a start lays gradient buckets out differently from later steps, and a ring
    all-reduce then rounds differently (1-2 ulp, growing): exact only through train.exact_allreduce (auto: on here).
    The checkpoint at 320 images falls between log rows (every 96): the first row after the resume must still
    average the same steps as the uninterrupted run's."""
    args = [
        *TINY,
        f"data.path={tiny_shards}",
        "train.total_images=960",
        "train.log_every_images=96",
        "train.ckpt_every_images=320",
        "train.sample_every_images=100000",
        "train.cpu_threads=1",
    ]
    reference = run_train(tmp_path, *args, "run.name=reference", "train.ckpt_every_images=1000000", num_processes=4)
    _assert_ok(reference)
    crashed_dir = tmp_path / "runs" / "crashed"
    kill9_after_first_checkpoint(start_train(tmp_path, *args, "run.name=crashed", num_processes=4), crashed_dir)
    resumed = run_train(tmp_path, *args, "run.name=crashed", num_processes=4)
    _assert_ok(resumed)
    assert "resumed from" in resumed.stderr
    expected, got = read_metrics(tmp_path / "runs" / "reference"), read_metrics(crashed_dir)
    assert [row["step"] for row in got] == [row["step"] for row in expected] and all(
        row["world_size"] == 4 for row in got
    )
    for want, have in zip(expected, got):
        for key in ("loss", "mse", "kl", "grad_norm/autoencoder", "images_seen"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    summaries = [
        json.loads((tmp_path / "runs" / name / "summary.json").read_text()) for name in ("reference", "crashed")
    ]
    assert summaries[0]["parameter_checksums"] == summaries[1]["parameter_checksums"] and summaries[0]["ranks_in_sync"]
