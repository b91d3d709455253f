"""What a run tells its terminal or log file: a start line, each phase's loss per log row, an end line."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import train_in_process

from facegen_dist.log.logger import headline_figures


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
