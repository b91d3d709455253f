"""facegen report over two tiny real runs: every section, and only numbers their files hold."""

import json
import re

import pytest
from helpers import EVAL_TINY, TINY, TINY_VQVAE2, read_metrics, run_facegen, run_train

from facegen_dist.analysis.report import _fmt

pytestmark = pytest.mark.slow

EVAL = EVAL_TINY
NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.])")


def _numbers(tree, out: set[str]) -> set[str]:
    """Every numeric leaf of a JSON tree, as the report formats it."""
    if isinstance(tree, dict):
        for value in tree.values():
            _numbers(value, out)
    elif isinstance(tree, list):
        for value in tree:
            _numbers(value, out)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out.update({_fmt(tree), str(tree)})
    return out


def test_report_of_two_real_runs(tmp_path, tiny_shards):
    data, cache = f"data.path={tiny_shards}", f"eval.cache_dir={tmp_path / 'cache'}"
    vae = run_train(
        tmp_path,
        *TINY,
        data,
        "run.name=vae",
        "train.total_images=320",
        "train.log_every_images=80",
        "eval.every_images=160",
        "eval.during_training_num=32",
        "eval.metrics=[fid,psnr]",
        *EVAL,
        cache,
    )
    assert vae.returncode == 0, vae.stderr[-3000:]
    evaluated = run_facegen(
        tmp_path, "eval", "--run", "runs/vae", "--metrics=fid,psnr,ssim", "--num", "32", *EVAL, cache
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    vq = run_train(tmp_path, *TINY_VQVAE2, data, "run.name=vq", "train.total_images=320", "train.log_every_images=80")
    assert vq.returncode == 0, vq.stderr[-3000:]

    result = run_facegen(tmp_path, "report", "--runs", "runs/vae", "runs/vq", "--out", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "report"
    markdown, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for section in (
        "Training cost",
        "Quality (facegen eval)",
        "Codebook usage",
        "Samples and reconstructions",
        "Curves",
    ):
        assert f"## {section}" in markdown and f"<h2>{section}" in page

    runs = {name: tmp_path / "runs" / name for name in ("vae", "vq")}
    summaries = {name: json.loads((path / "summary.json").read_text()) for name, path in runs.items()}
    final_eval = json.loads(sorted((runs["vae"] / "eval").glob("0*.json"))[-1].read_text())
    # the first table: training cost
    training_vae = next(line for line in markdown.splitlines() if line.startswith("| vae "))
    assert (
        f"| {summaries['vae']['images_seen']} |" in training_vae
        and f"| {_fmt(summaries['vq']['img_per_s_mean'])} |" in markdown
    )
    assert (
        f"| {_fmt(final_eval['metrics']['psnr'])} |" in markdown
        and f"| {_fmt(final_eval['metrics']['fd_tiny-test'])} |" in markdown
    )
    assert "No `facegen eval` result for: vq." in markdown
    last_vq = [row for row in read_metrics(runs["vq"]) if "codebook_bottom/perplexity" in row][-1]
    assert f"| {_fmt(last_vq['codebook_bottom/perplexity'])} |" in markdown

    # Only numbers from the runs' files (or arithmetic on them, recomputed here) appear in the tables.
    allowed: set[str] = set()
    for name, path in runs.items():
        _numbers(summaries[name], allowed)
        for row in read_metrics(path):
            _numbers(row, allowed)
        for record in path.joinpath("eval").glob("*.json") if path.joinpath("eval").is_dir() else []:
            protocol = json.loads(record.read_text())["protocol"]
            _numbers(json.loads(record.read_text()), allowed)
            allowed.add(_fmt(protocol["seconds"] / protocol["num_generated"]))
        allowed.add(_fmt(summaries[name]["train_seconds"] / summaries[name]["images_seen"] * 1e6 / 3600))
    table_lines = [line for line in markdown.splitlines() if line.startswith("| vae ") or line.startswith("| vq ")]
    for line in table_lines:
        for token in NUMBER.findall(line):
            assert token in allowed, f"{token!r} in {line!r} is not in the runs' files"

    for image in re.findall(r"src='([^']+)'", page):
        assert (report / image).is_file(), image
    assert {
        "samples_vae.png",
        "reconstructions_vae.png",
        "reconstructions_vq.png",
        "loss_vae.png",
        "metric_psnr.png",
        "metric_fd_tiny-test.png",
    } <= {p.name for p in report.iterdir()}
    psnr_points = [
        record
        for record in (json.loads(line) for line in (runs["vae"] / "eval" / "history.jsonl").read_text().splitlines())
        if "psnr" in record["metrics"]
    ]
    assert len(psnr_points) == 3  # two in-training evaluations and the final one: the curve's points

    bad = run_facegen(tmp_path, "report", "--runs", str(tmp_path / "nothing"), "--out", "x")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("facegen: error: --runs:")


def test_suite_trains_evaluates_reports_and_a_rerun_redoes_nothing(tmp_path, tiny_shards):
    from helpers import REPO, TINY_VQVAE2

    tiny_vae = [o for o in TINY if not o.startswith("data.")]
    suite = tmp_path / "suite.yaml"
    # JSON is YAML
    suite.write_text(
        json.dumps(
            {
                "name": "tiny_suite",
                "run_dir": str(tmp_path / "runs" / "suite"),
                "images": 160,
                "processes": 2,
                "overrides": [
                    f"data.path={tiny_shards}",
                    "data.resolution=32",
                    "data.num_workers=1",
                    "train.sample_every_images=160",
                ],
                "runs": [
                    {
                        "config": str(REPO / "configs" / "vae_avatars64.yaml"),
                        "overrides": [*tiny_vae, "run.name=vae"],
                        "eval": ["--metrics", "psnr,ssim"],
                        "sample": 16,
                    },
                    {
                        "config": str(REPO / "configs" / "vqvae2_avatars64.yaml"),
                        "overrides": [o for o in TINY_VQVAE2 if o.startswith("model.")]
                        + ["train.batch_size=8", "log.wandb=off"],
                    },
                ],
            }
        )
    )
    first = run_facegen(tmp_path, "suite", "--suite", str(suite))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    root = tmp_path / "runs" / "suite"
    for name in ("vae", "vqvae2_avatars64"):
        summary = json.loads((root / name / "summary.json").read_text())
        assert summary["images_seen"] == 160 and summary["world_size"] == 2  # the one budget, on 2 processes
    evals = sorted((root / "vae" / "eval").glob("*.json"))
    assert len(evals) == 1 and "psnr" in json.loads(evals[0].read_text())["metrics"]
    markdown = (root / "report" / "report.md").read_text()
    assert (
        "| vae |" in markdown
        and "| vqvae2_avatars64 |" in markdown
        and "No `facegen eval` result for: vqvae2_avatars64." in markdown
    )

    assert (root / "vae" / "samples" / "suite_samples.json").is_file(), first.stdout[-2000:] + first.stderr[-3000:]
    timed = json.loads((root / "vae" / "samples" / "suite_samples.json").read_text())
    assert timed["num"] == 16 and f"| {_fmt(timed['seconds_per_image'])} (16 on 2x cpu:0) |" in markdown
    assert markdown.count("| missing |") >= 1  # the VQ-VAE2 run draws no samples: its inference cell is missing

    stamps = {
        p: p.stat().st_mtime_ns
        for p in [root / "vae" / "summary.json", evals[0], root / "vae" / "samples" / "suite_samples.json"]
    }
    again = run_facegen(tmp_path, "suite", "--suite", str(suite))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr and "evaluating" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(
        list((root / "vae" / "eval").glob("*.json"))
    ) == 1
