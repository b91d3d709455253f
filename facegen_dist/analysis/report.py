"""`facegen report --runs runs/* --out report/`: the comparison of trained runs, from their files only.

Reads each run folder (config.yaml, summary.json, metrics.jsonl, eval/*.json, eval/history.jsonl, samples/*_final.png)
and writes report.md, report.html, the figures (loss curves, metric vs images seen) and copies of the final grids.
Nothing is re-measured or estimated (what a run's files lack shows as missing), except the parameter count.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from facegen_dist.errors import FacegenError

MISSING = "missing"
CODEBOOK_KEYS = ("perplexity", "used_frac", "dead_codes")
SAMPLE_METRIC_PREFIXES = ("fid", "fd_", "kid", "precision", "recall", "f_score", "isc", "is_")


@dataclass
class RunFacts:
    name: str
    path: Path
    method: str
    resolution: int
    parameters: dict[str, int]
    summary: dict
    rows: list[dict]
    evals: list[dict]  # final evaluations (facegen eval), newest last
    history: list[dict]  # every evaluation record, in-training ones included
    grids: dict[str, Path] = field(default_factory=dict)
    sampling: dict | None = None  # the newest `facegen sample` record saved in the run's samples/ folder


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


def _parameters(cfg) -> dict[str, int]:
    """Counted from the modules the config builds (no weights are loaded); {} where they cannot be built here (a prior whose VQ run is elsewhere)."""
    from facegen_dist.runs import build_method

    try:
        modules = build_method(cfg.model, cfg.data.resolution).build_modules()
    except (FacegenError, OSError):
        return {}
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def read_run(path: Path) -> RunFacts:
    from facegen_dist.config import load_config

    if not (path / "config.yaml").is_file():
        raise FacegenError(f"--runs: {path} is not a run folder (no config.yaml)")
    # the run's shards need not be on this machine
    cfg = load_config([str(path / "config.yaml")], ["data.path=embedded:avatars"])
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    evals = (
        [json.loads(p.read_text()) for p in sorted((path / "eval").glob("*.json"))] if (path / "eval").is_dir() else []
    )
    evals.sort(key=lambda record: record["protocol"]["model"].get("images_seen", 0))
    grids = {
        kind: path / "samples" / f"{kind}_final.png"
        for kind in ("samples", "reconstructions")
        if (path / "samples" / f"{kind}_final.png").is_file()
    }
    sample_records = (
        [json.loads(p.read_text()) for p in sorted((path / "samples").glob("*.json"))]
        if (path / "samples").is_dir()
        else []
    )
    sample_records = sorted(
        (r for r in sample_records if "seconds_per_image" in r), key=lambda r: r.get("images_seen", 0)
    )
    return RunFacts(
        path.name,
        path,
        cfg.model.name,
        cfg.data.resolution,
        _parameters(cfg),
        summary,
        _read_jsonl(path / "metrics.jsonl"),
        evals,
        _read_jsonl(path / "eval" / "history.jsonl"),
        grids,
        sample_records[-1] if sample_records else None,
    )


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def training_row(run: RunFacts) -> dict[str, str]:
    summary = run.summary
    seconds, images = summary.get("train_seconds"), summary.get("images_seen")
    peaks = [row["peak_mem_gb"] for row in run.rows if "peak_mem_gb" in row]
    return {
        "run": run.name,
        "method": run.method,
        "resolution": f"{run.resolution} px",
        "parameters": ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in run.parameters.items()) or MISSING,
        "images trained": _fmt(images),
        "processes": _fmt(summary.get("world_size")),
        "train img/s": _fmt(summary.get("img_per_s_mean")),
        "wall h per 1M images": _fmt(seconds / images * 1e6 / 3600 if seconds and images else None),
        "peak memory GB (rank 0)": _fmt(max(peaks) if peaks else None),
        "inference s/image (facegen sample; priors: sampling + decoding)": (
            f"{_fmt(run.sampling['seconds_per_image'])} ({run.sampling['num']} on {run.sampling['processes']}x {run.sampling['device']})"
            if run.sampling
            else MISSING
        ),
    }


def quality_rows(run: RunFacts) -> list[dict[str, str]]:
    """One row per final evaluation file: its metrics and protocol."""
    rows = []
    for record in run.evals:
        protocol = record["protocol"]
        seconds, generated = protocol.get("seconds"), protocol.get("num_generated")
        if not any(name.startswith(SAMPLE_METRIC_PREFIXES) for name in record["metrics"]):
            generated = (
                None  # reconstruction metrics only: the record's num_generated is a setting, no sample was drawn
            )
        drawn = f"{generated} generated vs" if generated else "reconstructions of"
        rows.append(
            {
                "run": run.name,
                "checkpoint": f"{protocol['model'].get('checkpoint', '?')}: {protocol['model'].get('images_seen')} images{', EMA' if protocol['model'].get('ema') else ''}",
                **{name: _fmt(value) for name, value in sorted(record["metrics"].items())},
                "protocol": f"{drawn} {protocol.get('num_reference')} {protocol.get('reference', {}).get('split', '?')} images, "
                f"{protocol.get('extractor', {}).get('name', '?')} features, {protocol.get('resolution')} px, seed {protocol.get('seed')}",
                "eval s per generated image (whole eval: sampling, features, statistics)": _fmt(
                    seconds / generated if seconds and generated else None
                ),
            }
        )
    return rows


def codebook_row(run: RunFacts) -> dict[str, str] | None:
    last = next((row for row in reversed(run.rows) if any("codebook" in key for key in row)), None)
    if last is None:
        return None
    values = {
        key.split("codebook_", 1)[1]: value
        for key, value in last.items()
        if "codebook_" in key and key.rsplit("/", 1)[-1] in CODEBOOK_KEYS
    }
    return {
        "run": run.name,
        "at images": _fmt(last.get("images_seen")),
        **{key: _fmt(value) for key, value in sorted(values.items())},
    }


def _table_md(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_none of these runs has such figures_\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row.get(column, MISSING) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _table_html(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p><em>none of these runs has such figures</em></p>"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(row.get(c, MISSING))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def y_scale(series: dict[str, list[tuple[float, float]]], log_y: bool) -> str:
    """log when asked and every value is positive; symlog when some are not (a hinge generator
    loss, -D(x_rec), goes negative, and a log axis would drop that line without a word)."""
    if not log_y:
        return "linear"
    return "log" if all(y > 0 for points in series.values() for _, y in points) else "symlog"


def _plot(
    series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, path: Path, log_y: bool = False
) -> bool:
    series = {name: points for name, points in series.items() if points}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6))
    for name, points in series.items():
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o" if len(points) < 20 else None, label=name)
    axis.set_xlabel("images seen")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    scale = y_scale(series, log_y)
    if scale == "symlog":
        axis.set_yscale("symlog", linthresh=1e-2)
    elif scale == "log":
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def loss_series(run: RunFacts) -> dict[str, list[tuple[float, float]]]:
    """Every logged training objective: *loss keys, and the priors' nll (they log no *loss key)."""
    keys = sorted(
        {
            key
            for row in run.rows
            for key in row
            if (key.endswith("loss") or key.split("/")[-1] == "nll") and not key.startswith("eval/")
        }
    )
    return {key: [(row["images_seen"], row[key]) for row in run.rows if key in row] for key in keys}


def metric_series(runs: list[RunFacts]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """metric -> run -> [(images seen, value)], from every evaluation record (in-training and final)."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for run in runs:
        for record in run.history:
            seen = record["protocol"]["model"].get("images_seen")
            for metric, value in record["metrics"].items():
                if seen is not None:
                    out.setdefault(metric, {}).setdefault(run.name, []).append((seen, value))
    return out


def build_report(run_dirs: list[Path], out: Path) -> Path:
    runs = [read_run(path) for path in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []  # (caption, file)
    for run in runs:
        name = f"loss_{run.name}.png"
        if _plot(loss_series(run), f"{run.name}: losses", "loss", out / name, log_y=True):
            figures.append((f"{run.name}: training losses", name))
    for metric, series in sorted(metric_series(runs).items()):
        name = f"metric_{metric}.png"
        if _plot(series, f"{metric} vs images seen", metric, out / name):
            figures.append((f"{metric} vs images seen (every evaluation, in-training ones included)", name))
    grids = []
    for run in runs:
        for kind, source in run.grids.items():
            target = f"{kind}_{run.name}.png"
            shutil.copyfile(source, out / target)
            grids.append((run.name, kind, target))

    sections = {
        "Training cost": [training_row(run) for run in runs],
        "Quality (facegen eval)": [row for run in runs for row in quality_rows(run)],
        "Codebook usage (VQ models, last logged values)": [row for run in runs if (row := codebook_row(run))],
    }
    missing_eval = [run.name for run in runs if not run.evals]
    note = f"No `facegen eval` result for: {', '.join(missing_eval)}." if missing_eval else ""

    md = [
        "# facegen report",
        "",
        f"Runs: {', '.join(run.name for run in runs)}. Every figure is read from the run folders; `{MISSING}` means the run's files do not have it.",
        "",
    ]
    for title, rows in sections.items():
        md += [f"## {title}", "", _table_md(rows)]
        if title.startswith("Quality") and note:
            md += [note, ""]
    md += ["## Samples and reconstructions", ""]
    md += [f"**{run}** {kind}:\n\n![{run} {kind}]({file})\n" for run, kind, file in grids] or ["_no final grids_\n"]
    md += ["## Curves", ""] + [f"{caption}:\n\n![{caption}]({file})\n" for caption, file in figures]
    (out / "report.md").write_text("\n".join(md))

    body = [
        f"<h1>facegen report</h1><p>Runs: {html.escape(', '.join(run.name for run in runs))}. Every figure is read from the run folders; "
        f"<em>{MISSING}</em> means the run's files do not have it.</p>"
    ]
    for title, rows in sections.items():
        body.append(f"<h2>{html.escape(title)}</h2>{_table_html(rows)}")
        if title.startswith("Quality") and note:
            body.append(f"<p>{html.escape(note)}</p>")
    body.append("<h2>Samples and reconstructions</h2><div class='grids'>")
    body += [
        f"<figure><img src='{file}'><figcaption>{html.escape(run)}: {kind}</figcaption></figure>"
        for run, kind, file in grids
    ]
    body.append("</div><h2>Curves</h2>")
    body += [
        f"<figure><img src='{file}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, file in figures
    ]
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}.scroll{overflow-x:auto}"
        ".grids{display:flex;flex-wrap:wrap;gap:12px}figure img{max-width:360px}"
    )
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>facegen report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    return out / "report.md"
