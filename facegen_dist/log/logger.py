"""Where reduced stats go: metrics.jsonl, the progress bar and W&B. The only module that imports wandb.

Only the main process builds a RunLogger; other ranks get a NullLogger.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from tqdm import tqdm

# What the bar and the plain log line show of each phase: its first key found here (a VQ-GAN's generator/loss,
# discriminator/d_loss; a prior's nll), and for a one-phase method mse and kl beside it.
MAIN_KEYS = ("loss", "d_loss", "nll", "g_loss")
SIDE_KEYS = ("mse", "kl")
NOT_PHASES = ("grad_norm", "eval")


def headline_figures(row: dict) -> dict[str, float]:
    """Each phase's main loss (prefixed by the phase when there are several) and the interval's img/s."""
    figures = {}
    prefixes = dict.fromkeys(k.split("/", 1)[0] for k in row if "/" in k and k.split("/", 1)[0] not in NOT_PHASES)
    phases = [p for p in prefixes if any(f"{p}/{key}" in row for key in MAIN_KEYS)]
    if phases:
        for phase in phases:
            key = next(key for key in MAIN_KEYS if f"{phase}/{key}" in row)
            figures[phase if key == "loss" else f"{phase}/{key}"] = row[f"{phase}/{key}"]
    else:
        main = next((key for key in MAIN_KEYS if key in row), None)
        figures.update({key: row[key] for key in (main, *SIDE_KEYS) if key is not None and key in row})
    if "img_per_s" in row:
        figures["img/s"] = row["img_per_s"]
    return figures


def dashboard_labels(config: dict) -> dict:
    """W&B group (the method) and tags (method, data set, resolution), to filter and compare runs on a dashboard."""
    model, data = config.get("model", {}).get("name", "?"), config.get("data", {})
    data_name = str(data.get("path", "?")).rstrip("/").rsplit("/", 1)[-1]
    return {"group": model, "tags": [model, data_name, f"{data.get('resolution', '?')}px"]}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class NullLogger:
    wandb_run_id = None
    wandb_sync_dir = None

    def log(self, row: dict) -> None: ...
    def log_images(self, images: dict[str, str], step: int, images_seen: int) -> None: ...
    def advance(self, images: int) -> None: ...
    def write(self, message: str) -> None: ...
    def close(self) -> None: ...


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows logged after `last_step` (work a crash threw away), so no step is logged twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the crash
        if row.get("step", -1) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger(NullLogger):
    def __init__(
        self,
        run_dir: Path,
        config: dict,
        total_images: int,
        images_seen: int,
        wandb_mode: str,
        wandb_project: str,
        wandb_run_id: str | None,
        progress: bool,
    ):
        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.total_images = total_images
        # A terminal gets the bar; a log file (SLURM, nohup) one plain line per log row instead of \r updates.
        self.plain_lines = progress and not sys.stderr.isatty()
        self.bar = tqdm(
            total=total_images,
            initial=images_seen,
            unit="img",
            unit_scale=True,
            desc=run_dir.name,
            disable=not progress or self.plain_lines,
            dynamic_ncols=True,
            mininterval=1.0,
            # no tqdm rate: img/s comes from the log row, the one figure metrics.jsonl and W&B hold too
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} img [{elapsed}<{remaining}{postfix}]",
        )
        self._started = time.perf_counter()
        self._start_images = images_seen
        self._wandb = None
        self.wandb_run_id = wandb_run_id
        if wandb_mode != "off":
            self._start_wandb(config, wandb_mode, wandb_project, wandb_run_id)

    def _start_wandb(self, config: dict, mode: str, project: str, run_id: str | None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run_id = run_id or uuid.uuid4().hex[:8]
        # Same id + resume="allow": a resumed or requeued run continues the same dashboard.
        self._wandb = wandb.init(
            project=project,
            name=self.run_dir.name,
            id=self.wandb_run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,
            config=config,
            **dashboard_labels(config),
        )
        # Images seen is the project's unit of training (schedules, budgets, resumes): the x-axis of every chart.
        self._wandb.define_metric("images_seen")
        self._wandb.define_metric("*", step_metric="images_seen")
        self.wandb_sync_dir = self._wandb.settings.sync_dir if mode == "offline" else None

    def log(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        figures = {k: f"{v:.4g}" for k, v in headline_figures(row).items()}
        if self.plain_lines:
            self.write(self._plain_line(row, figures))
        else:
            self.bar.set_postfix(figures, refresh=False)

    def _plain_line(self, row: dict, figures: dict[str, str]) -> str:
        seen = row["images_seen"]
        rate = (seen - self._start_images) / max(time.perf_counter() - self._started, 1e-9)
        eta = f" | eta {_duration((self.total_images - seen) / rate)}" if rate > 0 and seen < self.total_images else ""
        shown = " ".join(f"{k} {v}" for k, v in figures.items())
        return f"{self.run_dir.name}: {seen}/{self.total_images} img ({100 * seen / max(self.total_images, 1):.0f}%) step {row['step']} | {shown}{eta}"

    def log_images(self, images: dict[str, str], step: int, images_seen: int) -> None:
        if self._wandb is not None:
            import wandb

            logged = {name: wandb.Image(path) for name, path in images.items()}
            self._wandb.log({**logged, "images_seen": images_seen}, step=step)

    def advance(self, images: int) -> None:
        self.bar.update(images)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
