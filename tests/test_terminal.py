"""What a run tells its terminal or log file: a start line, each phase's loss per log row, an end line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY, TINY_DCGAN, run_train, train_in_process, wandb_records

from facegen_dist.log.logger import headline_figures

CONSTANT_LR = ["optim.warmup_images=0", "optim.schedule=constant"]


def test_headline_figures_name_each_phase_main_loss_and_one_throughput():
    vae = {"loss": 21.0, "mse": 0.02, "kl": 1.0, "img_per_s": 50.0, "grad_norm/autoencoder": 3.0}
    assert headline_figures(vae) == {"loss": 21.0, "mse": 0.02, "kl": 1.0, "img/s": 50.0}
    vqgan = {
        "generator/loss": 0.3,
        "generator/rec": 0.1,
        "generator/codebook_bottom/usage": 0.5,
        "discriminator/d_loss": 1.9,
        "grad_norm/generator": 2.0,
        "eval/psnr": 20.0,
        "img_per_s": 10.0,
    }
    assert headline_figures(vqgan) == {"generator": 0.3, "discriminator/d_loss": 1.9, "img/s": 10.0}
    two_level_prior = {"prior_top/nll": 4.0, "prior_bottom/nll": 5.0, "prior_top/bits_per_code": 5.8}
    assert headline_figures(two_level_prior) == {"prior_top/nll": 4.0, "prior_bottom/nll": 5.0}
    assert headline_figures({"nll": 4.0, "bits_per_code": 5.8}) == {"nll": 4.0}


def test_a_run_logging_to_a_file_says_where_it_writes_then_one_plain_line_per_row_then_where_its_summary_is(
    tiny_shards, tmp_path, in_process_accelerator, capfd
):
    summary = train_in_process(tiny_shards, tmp_path / "talk", 48, "log.progress=true")
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("facegen:", "talk:"))]
    assert "\r" not in err  # no bar updates in a file
    start = lines[0]
    assert start.startswith(f"facegen: {tmp_path / 'talk'}: vae, ") and "M parameters | 1 cpu process (single" in start
    assert "global batch 8 | to 48 images" in start
    rows = [json.loads(line) for line in (tmp_path / "talk" / "metrics.jsonl").read_text().splitlines()]
    plain = [line for line in lines if line.startswith("talk: ")]
    assert len(plain) == len(rows) == 3
    assert plain[0].startswith("talk: 16/48 img (33%) step 2 | loss ") and " mse " in plain[0] and " img/s " in plain[0]
    assert f"loss {rows[-1]['loss']:.4g}" in plain[-1]
    assert lines[-1].startswith(f"facegen: {tmp_path / 'talk'} done: 48 images in ")
    assert lines[-1].endswith(f"summary {tmp_path / 'talk' / 'summary.json'}") and summary["images_seen"] == 48


def test_an_offline_wandb_run_ends_with_the_command_that_uploads_it(
    tiny_shards, tmp_path, in_process_accelerator, capfd, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_in_process(tiny_shards, tmp_path / "dash", 16, "log.wandb=offline")
    last = [line for line in capfd.readouterr().err.splitlines() if line.startswith("facegen:")][-1]
    sync_dir = last.split("wandb sync ", 1)[1]
    assert (tmp_path / "dash") in Path(sync_dir).parents
    assert any(p.suffix == ".wandb" for p in Path(sync_dir).iterdir())


def test_the_wandb_dashboard_plots_against_images_seen_grouped_and_tagged(
    tiny_shards, tmp_path, in_process_accelerator
):
    train_in_process(tiny_shards, tmp_path / "dash", 32, "log.wandb=offline")
    (run_file,) = (tmp_path / "dash" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "vae" and list(run.tags) == ["vae", tiny_shards.name, "32px"]
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "images_seen" for m in metrics)
    history = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]
    assert [json.loads(row["images_seen"]) for row in history] == [16, 32]
    assert all("loss" in row for row in history) and "samples/path" in history[-1]  # the final grids, at 32 images


def test_a_two_phase_run_shows_and_logs_each_phase(tiny_shards, tmp_path, in_process_accelerator, capfd):
    dcgan = [o for o in TINY_DCGAN if not o.startswith("optim.")]  # the default optim.lr, asserted below
    train_in_process(
        tiny_shards, tmp_path / "gan", 16, "log.progress=true", "model.disc_lr=1e-4", *CONSTANT_LR, model=dcgan
    )
    (row,) = [json.loads(line) for line in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert row["lr/discriminator"] == 1e-4 and row["lr/generator"] == 1e-3  # model.disc_lr; optim.lr (default)
    (line,) = [line for line in capfd.readouterr().err.splitlines() if line.startswith("gan: ")]
    assert "discriminator/d_loss " in line and " generator " in line and " img/s " in line


@pytest.mark.slow
def test_two_launched_processes_print_no_deepspeed_accelerator_warning_into_the_log(tiny_shards, tmp_path):
    result = run_train(
        tmp_path, *TINY, f"data.path={tiny_shards}", "train.total_images=16", "log.progress=true", num_processes=2
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr
    assert "2 cpu processes (ddp, fp32) | global batch 16 | to 16 images" in result.stderr
