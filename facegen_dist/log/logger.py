"""Where reduced stats go: metrics.jsonl, the progress bar and W&B. The only module that imports wandb.

Only the main process builds a RunLogger; other ranks get a NullLogger.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm


class NullLogger:
    wandb_run_id = None

    def log(self, row: dict) -> None: ...
    def log_images(self, images: dict[str, str], step: int) -> None: ...
    def advance(self, images: int, postfix: dict | None = None) -> None: ...
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
        self.bar = tqdm(
            total=total_images,
            initial=images_seen,
            unit="img",
            unit_scale=True,
            desc=run_dir.name,
            disable=not progress,
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
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
        )

    def log(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_images(self, images: dict[str, str], step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(path) for name, path in images.items()}, step=step)

    def advance(self, images: int, postfix: dict | None = None) -> None:
        self.bar.update(images)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        if self._wandb is not None:
            self._wandb.finish()
