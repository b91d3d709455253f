"""How many of a list of user mistakes end in one clear line: run each, classify what came out.

    python benchmarks/bad_inputs.py [--json benchmarks/results/bad_inputs_cpu_<date>.json]

Method and results: benchmarks/RESULTS.md, "Bad input: one line or not".
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import TINY, _env  # noqa: E402 — the tests' tiny model and environment

from facegen_dist.data.make_avatars import make_avatar_dataset  # noqa: E402

BASE = [*TINY, "train.total_images=64", "train.sample_every_images=100000"]

# (what the user got wrong, extra arguments, the word the one line must name)
CASES = [
    ("misspelt key", ["model.latnt_dim=3"], "model.latnt_dim"),
    ("unknown section", ["trian.batch_size=8"], "trian"),
    ("batch not a number", ["train.batch_size=abc"], "train.batch_size"),
    ("batch 0", ["train.batch_size=0"], "train.batch_size"),
    ("batch negative", ["train.batch_size=-8"], "train.batch_size"),
    ("budget 0", ["train.total_images=0"], "train.total_images"),
    ("accumulation 0", ["train.grad_accum=0"], "train.grad_accum"),
    ("lr 0", ["optim.lr=0"], "optim.lr"),
    ("lr negative", ["optim.lr=-1e-3"], "optim.lr"),
    ("lr overflowing", ["optim.lr=1e39"], "optim.lr"),
    ("unknown schedule", ["optim.schedule=linearish"], "optim.schedule"),
    ("resolution too small for the stages", ["data.resolution=16"], "data.resolution"),
    ("resolution not a multiple", ["data.resolution=33"], "data.resolution"),
    ("no shards there", ["data.path=/nonexistent/shards"], "data.path"),
    ("negative data workers", ["data.num_workers=-1"], "data.num_workers"),
    ("unknown model", ["model.name=vqgam"], "model.name"),
    ("latent 0", ["model.latent_dim=0"], "model.latent_dim"),
    ("latent negative", ["model.latent_dim=-3"], "model.latent_dim"),
    ("7 channel stages", ["model.channels=[8,8,8,8,8,8,8]"], "model.channels"),
    ("no channel stages", ["model.channels=[]"], "model.channels"),
    ("unknown precision", ["train.precision=fp8"], "train.precision"),
    ("run name ..", ["run.name=.."], "run.name"),
    ("run name .", ["run.name=."], "run.name"),
    ("run name escaping", ["run.name=a/../../x"], "run.name"),
    ("EMA beta above 1", ["train.ema_beta=1.5"], "train.ema_beta"),
    ("log interval 0", ["train.log_every_images=0"], "train.log_every_images"),
    ("checkpoint interval negative", ["train.ckpt_every_images=-5"], "train.ckpt_every_images"),
    ("keep no checkpoint", ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    ("unknown W&B mode", ["log.wandb=maybe"], "log.wandb"),
    ("shuffle group 0", ["data.shuffle_group=0"], "data.shuffle_group"),
    ("config file missing", ["--config", "missing.yaml"], "missing.yaml"),
    ("config top level a list", ["--config", "{list_yaml}"], "list.yaml"),
    ("config not YAML", ["--config", "{broken_yaml}"], "broken.yaml"),
    ("resume: another model", ["model.name=ae", "run.name=trained"], "model"),
    ("resume: another latent size", ["model.latent_dim=32", "run.name=trained"], "autoencoder."),
    ("resume: another width", ["model.channels=[8,16,16,32,64]", "run.name=trained"], "autoencoder."),
]


def classify(result: subprocess.CompletedProcess, names: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]
    if result.returncode == 0:
        return "accepted"
    if "Traceback" in result.stderr:
        return "traceback"
    if len(errors) != 1:
        return f"{len(errors)} error lines"
    return "one line" if names in errors[0] else "one line, not naming it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="facegen-bad-inputs-") as scratch:
        root = Path(scratch)
        shards = root / "shards"
        make_avatar_dataset(shards, num=120, size=32, seed=0, samples_per_shard=40, workers=1, progress=False)
        (root / "list.yaml").write_text("- train:\n    batch_size: 8\n")
        (root / "broken.yaml").write_text("train: {batch_size: 8\n")
        data = f"data.path={shards}"
        trained = subprocess.run(
            [sys.executable, str(REPO / "train.py"), *BASE, data, "run.name=trained"],
            cwd=root,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if trained.returncode != 0:
            raise SystemExit(f"bad_inputs: the run to resume did not train:\n{trained.stderr[-3000:]}")
        rows = []
        for what, extra, names in CASES:
            extra = [a.format(list_yaml=root / "list.yaml", broken_yaml=root / "broken.yaml") for a in extra]
            if not any(a.startswith("run.name=") for a in extra):
                extra = [*extra, f"run.name=case{len(rows)}"]
            result = subprocess.run(
                [sys.executable, str(REPO / "train.py"), *BASE, data, *extra],
                cwd=root,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            outcome = classify(result, names)
            line = next((x for x in result.stderr.splitlines() if x.startswith("facegen: error:")), "")
            rows.append(
                {"case": what, "args": extra, "outcome": outcome, "exit": result.returncode, "line": line[:300]}
            )
            print(f"{outcome:>24}  {what}: {line[:140] or result.stderr.strip().splitlines()[-1:]}", flush=True)
    good = sum(row["outcome"] == "one line" for row in rows)
    print(f"bad inputs: {good} of {len(rows)} end in one line naming the culprit")
    if args.json:
        record = {"date": datetime.date.today().isoformat(), "one_line": good, "cases": len(rows), "rows": rows}
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
