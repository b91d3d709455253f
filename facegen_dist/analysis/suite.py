"""`facegen suite --suite configs/suite_avatars.yaml`: train every model of a suite on one image budget, evaluate each, report.

A suite file names the runs (a config, extra overrides, the `facegen eval` arguments, how many samples
`facegen sample` should draw and time), the image budget every run gets (train.total_images) and their folder.
Each step is the command a user would type, run one after the other, so a stopped suite continues where it was.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from facegen_dist.errors import ConfigError


def load_suite(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"--suite: no such file '{path}'")
    suite = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("name", "run_dir", "images", "runs"):
        if key not in suite:
            raise ConfigError(f"{path}: '{key}' missing (see configs/suite_avatars.yaml)")
    for entry in suite["runs"]:
        if not Path(entry.get("config", "")).is_file():
            raise ConfigError(f"{path}: run config '{entry.get('config')}' not found")
    return suite


def _launch(processes: int, *args: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(processes),
        "--dynamo_backend",
        "no",
    ]
    if processes > 1:
        command.append("--multi_gpu")
    return command + ["-m", "facegen_dist.cli", *args]


def _run_name(config: str, overrides: list[str]) -> str:
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("run.name=")]
    return named[-1] if named else OmegaConf.load(config).run.name


def _evaluated(run_dir: Path) -> bool:
    """An evaluation of the run's newest checkpoint is on disk."""
    import json

    from facegen_dist.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None or not (run_dir / "eval").is_dir():
        return False
    return any(
        json.loads(p.read_text())["protocol"]["model"].get("checkpoint") == checkpoint.name
        for p in (run_dir / "eval").glob("*.json")
    )


def run_suite(suite: dict, processes: int, only: set[str]) -> list[Path]:
    """Train, evaluate and time the samples of each run of `suite` (those named in `only`; all if empty), one after the other.

    Each step is a command of its own (`accelerate launch -m facegen_dist.cli train ...`, then `... eval ...`); one
    that fails is reported and the suite goes on. A finished run is a no-op, and an evaluation already on disk for
    the run's newest checkpoint is not redone. Returns the run folders done.
    """
    run_root = Path(suite["run_dir"])
    done = []
    for entry in suite["runs"]:
        overrides = [o.format(run_dir=run_root) for o in [*suite.get("overrides", []), *entry.get("overrides", [])]]
        name = _run_name(entry["config"], overrides)
        if only and name not in only:
            continue
        run_dir = run_root / name
        train = _launch(
            processes,
            "train",
            "--config",
            entry["config"],
            f"train.total_images={suite['images']}",
            f"run.dir={run_root}",
            *overrides,
        )
        started = time.time()
        print(f"facegen suite: {name}: training ({suite['images']} images, {processes} process(es))", flush=True)
        if subprocess.call(train) != 0:
            print(f"facegen suite: {name}: training failed; the other runs go on", file=sys.stderr, flush=True)
            continue
        if entry.get("eval") and not _evaluated(run_dir):
            print(f"facegen suite: {name}: evaluating", flush=True)
            eval_overrides = [o for o in overrides if not o.startswith(("train.", "run.", "model."))]
            if subprocess.call(_launch(processes, "eval", "--run", str(run_dir), *entry["eval"], *eval_overrides)) != 0:
                print(f"facegen suite: {name}: evaluation failed; reported without it", file=sys.stderr, flush=True)
        timed = run_dir / "samples" / "suite_samples.png"
        if entry.get("sample") and not timed.with_suffix(".json").is_file():
            print(f"facegen suite: {name}: timing {entry['sample']} samples", flush=True)
            batch = max(1, min(16, int(entry["sample"]) // processes))  # every process needs at least one batch
            sample = _launch(
                processes,
                "sample",
                "--run",
                str(run_dir),
                "--num",
                str(entry["sample"]),
                "--batch-size",
                str(batch),
                "--out",
                str(timed),
            )
            if subprocess.call(sample) != 0:
                print(f"facegen suite: {name}: sampling failed; reported without it", file=sys.stderr, flush=True)
        print(f"facegen suite: {name}: done in {time.time() - started:.0f} s", flush=True)
        done.append(run_dir)
    return done
