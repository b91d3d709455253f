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


@pytest.fixture(scope="module")
def two_runs_report(tmp_path_factory, tiny_shards):
    """A VAE (evaluated in training and by facegen eval) and a VQ-VAE2 (never evaluated), and their report."""
    tmp_path = tmp_path_factory.mktemp("report")
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
    runs = {name: tmp_path / "runs" / name for name in ("vae", "vq")}
    return {
        "root": tmp_path,
        "report": report,
        "markdown": (report / "report.md").read_text(),
        "page": (report / "report.html").read_text(),
        "runs": runs,
        "summaries": {name: json.loads((path / "summary.json").read_text()) for name, path in runs.items()},
    }


def test_report_has_every_section_in_markdown_and_html(two_runs_report):
    for section in (
        "Training cost",
        "Quality (facegen eval)",
        "Codebook usage",
        "Samples and reconstructions",
        "Curves",
    ):
        assert f"## {section}" in two_runs_report["markdown"] and f"<h2>{section}" in two_runs_report["page"]


def test_report_tables_hold_the_runs_cost_eval_and_codebook_numbers(two_runs_report):
    markdown, runs, summaries = two_runs_report["markdown"], two_runs_report["runs"], two_runs_report["summaries"]
    final_eval = json.loads(sorted((runs["vae"] / "eval").glob("0*.json"))[-1].read_text())
    training_vae = next(line for line in markdown.splitlines() if line.startswith("| vae "))
    assert f"| {summaries['vae']['images_seen']} |" in training_vae
    assert f"| {_fmt(summaries['vq']['img_per_s_mean'])} |" in markdown
    assert f"| {_fmt(final_eval['metrics']['psnr'])} |" in markdown
    assert f"| {_fmt(final_eval['metrics']['fd_tiny-test'])} |" in markdown
    assert "No `facegen eval` result for: vq." in markdown
    last_vq = [row for row in read_metrics(runs["vq"]) if "codebook_bottom/perplexity" in row][-1]
    assert f"| {_fmt(last_vq['codebook_bottom/perplexity'])} |" in markdown


def test_report_tables_show_only_numbers_the_runs_files_hold(two_runs_report):
    """Only numbers from the runs' files (or arithmetic on them, recomputed here) appear in the tables."""
    markdown, runs, summaries = two_runs_report["markdown"], two_runs_report["runs"], two_runs_report["summaries"]
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
    assert table_lines
    for line in table_lines:
        for token in NUMBER.findall(line):
            assert token in allowed, f"{token!r} in {line!r} is not in the runs' files"


def test_report_page_images_exist_and_curves_have_every_eval_point(two_runs_report):
    report, runs = two_runs_report["report"], two_runs_report["runs"]
    for image in re.findall(r"src='([^']+)'", two_runs_report["page"]):
        assert (report / image).is_file(), image
    assert {
        "samples_vae.png",
        "reconstructions_vae.png",
        "reconstructions_vq.png",
        "loss_vae.png",
        "metric_psnr.png",
        "metric_fd_tiny-test.png",
    } <= {p.name for p in report.iterdir()}
    history = (runs["vae"] / "eval" / "history.jsonl").read_text().splitlines()
    psnr_points = [record for record in map(json.loads, history) if "psnr" in record["metrics"]]
    assert len(psnr_points) == 3  # two in-training evaluations and the final one: the curve's points


def test_report_of_a_missing_run_folder_is_one_line(two_runs_report):
    root = two_runs_report["root"]
    bad = run_facegen(root, "report", "--runs", str(root / "nothing"), "--out", "x")
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
