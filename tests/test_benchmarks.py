"""The benchmark scripts run end to end with tiny settings (their figures are not checked, only that they are sane)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=300)


def test_data_benchmark_smoke(tmp_path):
    out = tmp_path / "data.json"
    result = run_script("data.py", "--smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = {(row["content"], row["size"], row["format"]): row for row in report["rows"]}
    expected = {(content, 32, fmt) for content in ("avatar", "photo-like") for fmt in ("jpg", "png", "webp", "webp-lossless")}
    assert set(cells) == expected
    for cell, row in cells.items():
        for key in ("bytes_per_image", "encode_ms_per_image", "decode_augment_images_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (cell, key, row[key])
    assert {"date", "commit", "cpu", "versions", "command"} <= set(report["header"])
    assert "| photo-like | 32 | webp-lossless |" in result.stdout


def test_pixelcnn_sampling_benchmark_smoke():
    result = run_script("pixelcnn_sampling.py", "--channels", "8", "--layers", "2", "--num-codes", "16", "--grid", "4", "--num", "2",
                        "--repeats", "1", "--compare-naive", "--naive-grid", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 4x4 |"))
    assert row.rstrip().endswith("| yes |"), row  # the fast sampler returns the naive loop's codes


def test_gpt_sampling_benchmark_smoke():
    result = run_script("gpt_sampling.py", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 4x4 |"))
    assert row.rstrip().endswith("| yes |"), row  # the cached sampler returns the uncached loop's codes
