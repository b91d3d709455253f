"""Distributed strategies from configs/accelerate/, each with 2 real processes (gloo on CPU).

DeepSpeed ZeRO-1/2/3-offload must train exactly what DDP trains (same losses, the NaN step skipped on both
ranks), keep the ranks identical, write checkpoints that sampling reads, and resume bit-for-bit after kill -9.
Methods DeepSpeed cannot run, and FSDP without GPUs (accelerate does not set it up), stop at start-up in one line.
"""

import json
import math

import pytest
import torch
from helpers import (
    COMMON,
    TINY,
    TINY_VQVAE2,
    kill9_after_first_checkpoint,
    read_metrics,
    run_facegen,
    run_train,
    start_train,
)

pytestmark = pytest.mark.slow

# Every step logged (8 images x 2 ranks x 2 micro-batches); a NaN on rank 0 at step 3.
MATCH_ARGS = [
    *TINY,
    "train.total_images=640",
    "train.log_every_images=32",
    "train.grad_accum=2",
    "train.sample_every_images=100000",
    "debug.inject_nan_at_steps=[3]",
]


def _assert_ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    )


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("ddp")
    _assert_ok(
        run_train(root, *MATCH_ARGS, f"data.path={tiny_shards}", "run.name=ddp", num_processes=2, strategy="ddp")
    )
    return root / "runs" / "ddp"


def test_ddp_config_runs_ddp(ddp_reference):
    summary = _summary(ddp_reference)
    assert summary["strategy"] == "ddp" and summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert len(summary["parameter_checksums"]) == 2


# On this machine (2026-12-01, deepspeed 0.19.8) ZeRO-3 + offload, whose DeepSpeedCPUAdam is JIT-built here, drifts
# from DDP's torch AdamW far beyond rounding (kl 1.4 %, weights checksum 3e-4 by step 20); the code from before the
# 2026-12-01 changes fails the same way on it; not yet explained. Kept visible as an expected failure, not loosened.
ZERO3_OFFLOAD_DRIFT = pytest.mark.xfail(
    reason="ZeRO-3 offload drifts from DDP on this machine (DeepSpeedCPUAdam?), not explained yet", strict=False
)


@pytest.mark.parametrize(
    "strategy", ["ds_zero1", "ds_zero2", pytest.param("ds_zero3_offload", marks=ZERO3_OFFLOAD_DRIFT)]
)
def test_deepspeed_trains_what_ddp_trains(strategy, ddp_reference, tiny_shards, tmp_path):
    from facegen_dist.runs import restore_run

    _assert_ok(
        run_train(tmp_path, *MATCH_ARGS, f"data.path={tiny_shards}", "run.name=ds", num_processes=2, strategy=strategy)
    )
    run_dir = tmp_path / "runs" / "ds"
    summary, reference = _summary(run_dir), _summary(ddp_reference)
    expected_name = {
        "ds_zero1": "deepspeed-zero1",
        "ds_zero2": "deepspeed-zero2",
        "ds_zero3_offload": "deepspeed-zero3-offload",
    }[strategy]
    assert summary["strategy"] == expected_name and summary["world_size"] == 2
    assert len(summary["parameter_checksums"]) == 2 and summary["ranks_in_sync"]
    # DeepSpeed skipped the NaN step on both ranks too
    assert summary["skipped_steps"] == 1 == reference["skipped_steps"]
    got, want = read_metrics(run_dir), read_metrics(ddp_reference)
    assert [row["step"] for row in got] == [row["step"] for row in want] == list(range(1, 21))
    for have, expected in zip(got, want):
        # NaN at (0-based) step 3: row 4 logs no loss
        assert ("loss" in have) == ("loss" in expected) == (have["step"] != 4)
        for key in ("loss", "mse", "kl", "grad_norm/autoencoder") if "loss" in have else ():
            # Same data, same fp32 maths; only the order of the gradient reductions differs (ZeRO-3 gathers partitions).
            assert math.isclose(have[key], expected[key], rel_tol=1e-4), (
                f"step {have['step']} {key}: {have[key]} vs DDP {expected[key]}"
            )
    assert math.isclose(summary["parameter_checksums"][0], reference["parameter_checksums"][0], rel_tol=1e-5)

    # The checkpoint carries whole weights (gathered under ZeRO-3) that inference reads like a DDP run's.
    restored = restore_run(run_dir, use_ema=False)
    total = torch.zeros((), dtype=torch.float64)
    for param in restored.modules["autoencoder"].parameters():
        flat = param.double().flatten()
        total += (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum()
    assert float(total) == summary["parameter_checksums"][0]


def _resume_args(base, name, total):
    # Every step logged so per-step losses compare exactly; checkpoints every 10 steps.
    return [
        *base,
        f"run.name={name}",
        f"train.total_images={total}",
        "train.log_every_images=16",
        "train.ckpt_every_images=160",
        "train.sample_every_images=100000",
        "optim.schedule=cosine",
        "optim.warmup_images=64",
        "data.num_workers=2",
    ]


@pytest.mark.parametrize(
    ("strategy", "base", "keys"),
    [
        ("ds_zero2", TINY, ("loss", "mse", "kl", "lr", "grad_norm/autoencoder")),
        ("ds_zero1", [*TINY_VQVAE2, "train.activation_checkpointing=true"], ("loss", "lr", "grad_norm/vqvae")),
    ],
    ids=["vae-zero2", "vqvae2-zero1-activation-checkpointing"],
)
def test_deepspeed_kill9_then_rerun_reproduces_uninterrupted_run(strategy, base, keys, tiny_shards, tmp_path):
    data, total = f"data.path={tiny_shards}", 960
    reference = run_train(
        tmp_path,
        *_resume_args(base, "reference", total),
        data,
        "train.ckpt_every_images=1000000",
        num_processes=2,
        strategy=strategy,
    )
    _assert_ok(reference)

    crashed_dir = tmp_path / "runs" / "crashed"
    kill9_after_first_checkpoint(
        start_train(tmp_path, *_resume_args(base, "crashed", total), data, strategy=strategy), crashed_dir
    )
    assert not (crashed_dir / "summary.json").exists()
    assert read_metrics(crashed_dir)[-1]["step"] < total // 16

    resumed = run_train(tmp_path, *_resume_args(base, "crashed", total), data, num_processes=2, strategy=strategy)
    _assert_ok(resumed)
    assert "resumed from" in resumed.stderr

    expected, got = read_metrics(tmp_path / "runs" / "reference"), read_metrics(crashed_dir)
    assert [row["step"] for row in got] == list(range(1, total // 16 + 1))  # no step lost or logged twice
    for want, have in zip(expected, got):
        for key in (*keys, "images_seen"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    final_reference, final_resumed = _summary(tmp_path / "runs" / "reference"), _summary(crashed_dir)
    assert final_resumed["ranks_in_sync"] and len(final_resumed["parameter_checksums"]) == 2
    assert final_reference["parameter_checksums"] == final_resumed["parameter_checksums"]


def test_channels_last_trains_what_contiguous_trains(tiny_shards, tmp_path):
    args = [
        *TINY_VQVAE2,
        f"data.path={tiny_shards}",
        "train.total_images=64",
        "train.log_every_images=16",
        "train.sample_every_images=100000",
    ]
    losses = {}
    for channels_last in ("false", "true"):
        _assert_ok(run_train(tmp_path, *args, f"run.name=cl-{channels_last}", f"train.channels_last={channels_last}"))
        losses[channels_last] = [row["loss"] for row in read_metrics(tmp_path / "runs" / f"cl-{channels_last}")]
    assert len(losses["true"]) == 4
    for a, b in zip(losses["false"], losses["true"]):
        assert math.isclose(a, b, rel_tol=1e-4), (losses["false"], losses["true"])  # same maths, another memory layout


def _one_error_line(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]


def test_two_optimizer_method_is_refused_under_deepspeed(tiny_shards, tmp_path):
    result = run_train(
        tmp_path,
        *COMMON,
        "model.name=dcgan",
        "model.gen_channels=8",
        "model.disc_channels=8",
        f"data.path={tiny_shards}",
        "train.total_images=32",
        num_processes=2,
        strategy="ds_zero2",
    )
    errors = _one_error_line(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "model.name=dcgan: 2 optimizers" in errors[0] and "configs/accelerate/ddp.yaml" in errors[0]
    assert "[rank0]: Traceback" not in result.stderr and not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_strategy_that_sets_up_nothing_is_refused(tiny_shards, tmp_path):
    """accelerate's FSDP without GPUs starts the processes but wraps nothing: refusing beats two unsynchronised models."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU accelerate does set up FSDP")
    result = run_train(
        tmp_path, *TINY, f"data.path={tiny_shards}", "train.total_images=32", num_processes=2, strategy="fsdp"
    )
    errors = _one_error_line(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "no distributed strategy" in errors[0] and "accelerate's FSDP needs GPUs" in errors[0]


def test_one_level_prior_trains_under_zero2_and_samples(tiny_shards, tmp_path):
    """A PixelCNN prior over a one-level VQ-VAE's codes (codes on the fly): one module, one optimizer, so DeepSpeed runs it."""
    common = [*COMMON, f"data.path={tiny_shards}", "train.total_images=160", "train.sample_every_images=100000"]
    _assert_ok(
        run_train(
            tmp_path,
            *common,
            "model.name=vqvae",
            "model.channels=16",
            "model.res_blocks=1",
            "model.res_channels=8",
            "model.embed_dim=8",
            "model.num_codes=32",
            "model.downsample=4",
            "run.name=vq",
            num_processes=2,
        )
    )
    _assert_ok(
        run_train(
            tmp_path,
            *common,
            "model.name=pixelcnn_prior",
            f"model.vq_run={tmp_path / 'runs' / 'vq'}",
            "model.channels=16",
            "model.layers=3",
            "model.kernel_size=3",
            "run.name=prior",
            num_processes=2,
            strategy="ds_zero2",
        )
    )
    summary = _summary(tmp_path / "runs" / "prior")
    assert summary["strategy"] == "deepspeed-zero2" and summary["ranks_in_sync"] and summary["world_size"] == 2
    assert all(math.isfinite(row["nll"]) for row in read_metrics(tmp_path / "runs" / "prior"))
    result = run_facegen(
        tmp_path,
        "sample",
        "--run",
        str(tmp_path / "runs" / "prior"),
        "--num",
        "4",
        "--out",
        str(tmp_path / "samples.png"),
    )
    assert result.returncode == 0 and (tmp_path / "samples.png").is_file(), result.stderr[-3000:]


def test_a_deepspeed_run_resumes_on_another_world_size_2_to_1_to_2_like_ddp(tiny_shards, tmp_path):
    """ZeRO-2's partitioned optimizer state re-partitioned through DeepSpeed's universal checkpoint, both ways.

    Each leg extends the finished run's budget, so every leg starts from the same checkpoint for both strategies;
    DDP's elastic resume carries the whole optimizer state, so equal losses mean the Adam moments came through.
    """
    rows = {}
    for strategy in ("ddp", "ds_zero2"):
        args = [
            *TINY,
            f"data.path={tiny_shards}",
            f"run.name={strategy}",
            "train.log_every_images=16",
            "train.sample_every_images=100000",
        ]
        for processes, total in ((2, 256), (1, 384), (2, 512)):
            result = run_train(
                tmp_path, *args, f"train.total_images={total}", num_processes=processes, strategy=strategy
            )
            _assert_ok(result)
            if total > 256 and strategy == "ds_zero2":
                assert (
                    f"DeepSpeed state re-partitioned from {3 - processes} to {processes} processes (universal checkpoint)"
                    in result.stderr
                )
        summary = _summary(tmp_path / "runs" / strategy)
        assert summary["images_seen"] == 512 and summary["world_size"] == 2 and summary["ranks_in_sync"]
        rows[strategy] = read_metrics(tmp_path / "runs" / strategy)
        assert not (tmp_path / "runs" / strategy / ".universal").exists()  # the converted copy is removed once loaded
    assert [row["images_seen"] for row in rows["ds_zero2"]] == [row["images_seen"] for row in rows["ddp"]]
    assert [row["world_size"] for row in rows["ds_zero2"]] == [2] * 16 + [1] * 8 + [2] * 8  # a row per 16 images
    for have, expected in zip(rows["ds_zero2"], rows["ddp"]):
        for key in ("loss", "mse", "kl", "grad_norm/autoencoder"):
            assert math.isclose(have[key], expected[key], rel_tol=1e-4), (
                f"step {have['step']} {key}: {have[key]} vs DDP {expected[key]}"
            )
