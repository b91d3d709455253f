"""tools/: the reconstruction comparison a user runs to see which run reconstructs sharper."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

TOOL = str(Path(__file__).resolve().parents[1] / "tools" / "compare_reconstructions.py")


def test_compare_reconstructions_draws_every_run_and_reports_eval_numbers(trained_run, tmp_path):
    import torch

    from facegen_dist.data.pipeline import read_images
    from facegen_dist.data.shards import split_shards
    from facegen_dist.eval.metrics import laplacian_energy, psnr, sharpness
    from facegen_dist.runs import restore_run

    run = trained_run / "runs" / "tiny"
    out = tmp_path / "compare.png"
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--run",
            str(run),
            "--run",
            f"{run}@ckpt-000000000160",
            "--num",
            "4",
            "--zoom",
            "2",
            "--out",
            str(out),
        ],
        cwd=trained_run,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "PSNR" in line]
    assert (
        len(lines) == 2
        and "ckpt-000000000320 (320 images, EMA)" in lines[0]
        and "ckpt-000000000160 (160 images, EMA)" in lines[1]
    )
    with Image.open(out) as image:
        assert image.size[0] > 4 * 64 and image.size[1] > 3 * 64  # 4 columns, 3 rows of 2x-zoomed 32 px images

    # The printed numbers are facegen eval's definitions over the same 4 val images, recomputed here.
    restored = restore_run(run)
    data_path = Path(restored.cfg.data.path)
    inputs = read_images(split_shards(data_path, "val"), 4, 32)[0].float().div(255)
    with torch.no_grad():
        output = restored.method.reconstruct(restored.modules, inputs).float().clamp(0, 1)
    printed_psnr, printed_sharpness = map(float, re.search(r"PSNR ([\d.]+) dB, sharpness ([\d.]+)", lines[0]).groups())
    assert printed_psnr == pytest.approx(float(psnr(output, inputs).mean()), abs=0.006)
    assert printed_sharpness == pytest.approx(sharpness(laplacian_energy(output), laplacian_energy(inputs)), abs=0.0006)


def test_compare_reconstructions_bad_run_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, TOOL, "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "not a run folder" in result.stderr
    assert not (tmp_path / "x.png").exists()
