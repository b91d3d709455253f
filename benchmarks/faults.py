"""How many `kill -9`s at random moments a 2-process run survives: rerun, it must end with the uninterrupted run's weights.

    python benchmarks/faults.py --kills 20 [--json benchmarks/results/faults_cpu_<date>.json]

Method and results: benchmarks/RESULTS.md, "Kill -9 at random moments".
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import TINY, _env, accelerate_command, kill9_tree  # noqa: E402 — the tests' launch and kill helpers

from facegen_dist.data.make_avatars import make_avatar_dataset  # noqa: E402

ARGS = [
    *TINY,
    "train.total_images=1280",
    "train.log_every_images=16",
    "train.sample_every_images=100000",
    "train.ckpt_every_images=64",
]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows]


def _run(cwd: Path, *args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        accelerate_command(2, *ARGS, *args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise SystemExit(f"faults: a run failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="facegen-faults-"))
    shards = root / "shards"
    make_avatar_dataset(shards, num=380, size=32, seed=0, samples_per_shard=50, workers=2, progress=False)
    data = f"data.path={shards}"
    duration = _run(root, data, "run.name=reference", "train.ckpt_every_images=1000000")
    reference = root / "runs" / "reference"
    want_checksums, want_losses = _summary(reference)["parameter_checksums"], _losses(reference)
    print(
        f"reference: {duration:.1f} s, {len(want_losses)} logged steps; {args.kills} kills at uniform moments of that span"
    )
    print(
        "| trial | kill at s | during a checkpoint write | checkpoints left | resumed from | weights equal | losses equal |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    trials = []
    for trial in range(args.kills):
        name = f"trial{trial}"
        run_dir = root / "runs" / name
        launch = subprocess.Popen(
            accelerate_command(2, *ARGS, data, f"run.name={name}"),
            cwd=root,
            env=_env(),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # before ~30 % of the span the processes are still starting up
        delay = rng.uniform(0.3 * duration, 1.0 * duration)
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline and launch.poll() is None:
            time.sleep(0.01)
        writing = any((run_dir / "checkpoints").glob(".tmp-ckpt-*"))
        finished = launch.poll() is not None
        kill9_tree(launch)
        left = (
            sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*"))
            if (run_dir / "checkpoints").is_dir()
            else []
        )
        rerun = subprocess.run(
            accelerate_command(2, *ARGS, data, f"run.name={name}"),
            cwd=root,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        resumed = next(
            (
                line.split("resumed from ")[1].split(" at ")[0].rsplit("/", 1)[-1]
                for line in rerun.stderr.splitlines()
                if "resumed from" in line
            ),
            "scratch",
        )
        ok = rerun.returncode == 0 and (run_dir / "summary.json").is_file()
        row = {
            "trial": trial,
            "kill_at_s": round(delay, 2),
            "run_had_finished": finished,
            "during_checkpoint_write": writing,
            "checkpoints_left": left,
            "resumed_from": resumed,
            "rerun_exit": rerun.returncode,
            "weights_equal": ok and _summary(run_dir)["parameter_checksums"] == want_checksums,
            "losses_equal": ok and _losses(run_dir) == want_losses,
        }
        trials.append(row)
        print(
            f"| {trial} | {delay:.1f} | {'yes' if writing else 'no'} | {len(left)} | {resumed} | {row['weights_equal']} | {row['losses_equal']} |",
            flush=True,
        )
    survived = sum(row["weights_equal"] and row["losses_equal"] for row in trials)
    during = sum(row["during_checkpoint_write"] for row in trials)
    print(
        f"\nsurvived {survived}/{len(trials)} kills ({during} during a checkpoint write): rerun ended with the reference's weights and losses"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": datetime.date.today().isoformat(),
                    "reference_s": duration,
                    "trials": trials,
                    "survived": survived,
                },
                indent=1,
            )
            + "\n"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
