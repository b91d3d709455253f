"""VQ-GAN end to end with real processes: phase isolation under DDP, the discriminator switching on, exact resume
across its start after kill -9, and the GPT prior trained on the run and sampled."""

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import (
    REPO,
    TINY_VQGAN,
    _env,
    accelerate_command,
    kill9_after_first_checkpoint,
    read_metrics,
    run_facegen,
    run_train,
    start_train,
)

pytestmark = pytest.mark.slow


def _assert_ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    )


def test_generator_and_discriminator_phases_touch_only_their_own_parameters(tmp_path, tiny_shards):
    out = tmp_path / "out"
    out.mkdir()
    script = [str(REPO / "tests" / "scripts" / "vqgan_phase_isolation.py"), str(out)]
    command = accelerate_command(
        2,
        *TINY_VQGAN,
        f"data.path={tiny_shards}",
        f"run.dir={tmp_path / 'runs'}",
        "run.name=iso",
        "model.disc_start_images=0",
        "train.grad_clip=0",
        script=script,
    )
    _assert_ok(subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600))
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["g_step_changed_g"] and not rank["g_step_changed_d"]
        assert rank["d_step_changed_d"] and not rank["d_step_changed_g"]
        assert rank["g_loss_reached_d"]  # the adversarial term back-propagates into D ...
        assert rank["max_grad_difference"] < 1e-6  # ... yet D steps with its own loss's gradients only
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # different data per rank, identical parameters


def _run_args(name, data):
    # 16 images a step over 2 ranks, every step logged; D turns on at 240 images (step 15), checkpoints every 160.
    return [
        *TINY_VQGAN,
        f"data.path={data}",
        f"run.name={name}",
        "train.total_images=480",
        "train.log_every_images=16",
        "train.ckpt_every_images=160",
        "train.sample_every_images=100000",
        "model.disc_start_images=240",
    ]


def test_two_processes_discriminator_starts_partway_and_kill9_resume_is_exact_across_it(tmp_path, tiny_shards):
    reference = run_train(tmp_path, *_run_args("reference", tiny_shards), num_processes=2)
    _assert_ok(reference)
    rows = read_metrics(tmp_path / "runs" / "reference")
    assert all(row["world_size"] == 2 for row in rows)
    before = [row for row in rows if row["images_seen"] <= 240]
    after = [row for row in rows if row["images_seen"] > 240]
    assert before and after
    assert not any("discriminator/d_loss" in row for row in before)  # D off, and its phase did not run
    assert all(math.isfinite(row["discriminator/d_loss"]) and math.isfinite(row["generator/g_loss"]) for row in after)
    assert all(0 <= row["generator/adaptive_weight"] <= 0.8 * 1e4 for row in after)
    assert all(math.isfinite(row["generator/loss"]) for row in rows)
    summary = json.loads((tmp_path / "runs" / "reference" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]

    crashed_dir = tmp_path / "runs" / "crashed"
    kill9_after_first_checkpoint(start_train(tmp_path, *_run_args("crashed", tiny_shards)), crashed_dir)
    killed_at = read_metrics(crashed_dir)[-1]["images_seen"]
    assert killed_at < 240, "the kill must land before the discriminator starts, so the resume crosses it"

    resumed = run_train(tmp_path, *_run_args("crashed", tiny_shards), num_processes=2)
    _assert_ok(resumed)
    assert "resumed from" in resumed.stderr
    got = read_metrics(crashed_dir)
    assert [row["step"] for row in got] == [row["step"] for row in rows]
    keys = (
        "generator/loss",
        "generator/rec",
        "generator/perceptual",
        "discriminator/d_loss",
        "generator/adaptive_weight",
        "grad_norm/discriminator",
    )
    for want, have in zip(rows, got):
        for key in keys:
            assert want.get(key) == have.get(key), f"step {want['step']} {key}: {want.get(key)} != {have.get(key)}"
    resumed_summary = json.loads((crashed_dir / "summary.json").read_text())
    assert resumed_summary["parameter_checksums"] == summary["parameter_checksums"]


def test_gpt_prior_trains_on_a_vqgan_run_and_samples(tmp_path, tiny_shards):
    vq = run_train(
        tmp_path,
        *TINY_VQGAN,
        f"data.path={tiny_shards}",
        "run.name=vqgan",
        "train.total_images=160",
        "model.disc_start_images=80",
    )
    _assert_ok(vq)
    prior_args = [
        f"data.path={tiny_shards}",
        "data.resolution=32",
        "model.name=gpt_prior",
        f"model.vq_run={tmp_path / 'runs' / 'vqgan'}",
        "model.layers=2",
        "model.heads=2",
        "model.width=32",
        "train.batch_size=8",
        "train.total_images=320",
        "train.log_every_images=64",
        "optim.lr=3e-3",
        "optim.warmup_images=0",
        "log.wandb=off",
        "log.progress=false",
        "log.num_grid_images=4",
        "data.num_workers=1",
        "run.name=gpt",
    ]
    prior = run_train(tmp_path, *prior_args, num_processes=2)
    _assert_ok(prior)
    rows = read_metrics(tmp_path / "runs" / "gpt")
    assert all(row["world_size"] == 2 for row in rows)
    assert rows[-1]["bits_per_code"] < rows[0]["bits_per_code"] <= math.log2(64) + 0.5
    assert (tmp_path / "runs" / "gpt" / "samples" / "samples_final.png").is_file()
    grids = {}
    for processes in (1, 2):
        out = tmp_path / f"samples{processes}.png"
        sampled = run_facegen(
            tmp_path,
            "sample",
            "--run",
            str(tmp_path / "runs" / "gpt"),
            "--num",
            "6",
            "--batch-size",
            "2",
            "--top-p",
            "0.9",
            "--out",
            str(out),
            num_processes=processes,
        )
        _assert_ok(sampled)
        grids[processes] = out.read_bytes()
    assert grids[1] == grids[2]  # the same seeded chunks, whoever draws them
    protocol = json.loads(Path(str(tmp_path / "samples1.png").replace(".png", ".json")).read_text())
    assert "GPT" in json.dumps(protocol) and "0.9" in json.dumps(protocol)
