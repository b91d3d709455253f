"""The strategy x method table of docs/scale.md, from real runs: does it run, peak memory, img/s.

    python benchmarks/strategies.py                        # 2 CPU processes (gloo), 64 px configs, short runs
    python benchmarks/strategies.py --processes 8 --gpu    # on a GPU node: one process per GPU
Method and results: benchmarks/RESULTS.md, "Strategy x method, real launches".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from setups import scratch_dir
from timing import cpu_model, git_commit

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ["ddp", "ds_zero1", "ds_zero2", "ds_zero3_offload", "fsdp"]
# (label, config, overrides): the 64 px configs, batch 16 per process.
METHODS = [
    ("VAE", "vae_avatars64", []),
    ("VQ-VAE2", "vqvae2_avatars64", []),
    ("VQ-GAN", "vqgan_avatars64", ["model.disc_start_images=320"]),
    ("DCGAN", "dcgan_avatars64", []),
    ("IntroVAE", "introvae_avatars64", []),
]
SMOKE_METHODS = [
    ("VAE", "vae_avatars64", ["data.resolution=32", "model.channels=[8,16,16,32,32]", "model.latent_dim=16"]),
    (
        "DCGAN",
        "dcgan_avatars64",
        ["data.resolution=32", "model.latent_dim=16", "model.gen_channels=8", "model.disc_channels=8"],
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    strategy: str, config: str, overrides: list[str], args, data: Path, run_dir: Path, name: str
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / f"{strategy}.yaml"),
        "--num_processes",
        str(args.processes),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        args.precision,
        str(REPO / "train.py"),
        "--config",
        str(REPO / "configs" / f"{config}.yaml"),
        *overrides,
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"run.name={name}",
        f"train.total_images={args.images}",
        f"train.batch_size={args.batch}",
        "log.wandb=off",
        "log.progress=false",
        "data.num_workers=1",
        "train.sample_every_images=100000000",
        f"train.log_every_images={args.images // 4}",
        "eval.every_images=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if not args.gpu and strategy == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # plain DDP on CPU; DeepSpeed and FSDP configs are launched as they are
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=args.timeout)


def cell(result: subprocess.CompletedProcess, summary_path: Path) -> dict:
    if result.returncode == 0 and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        return {
            "works": True,
            "img_per_s": summary["img_per_s_mean"],
            "peak_mem_gb": summary["final"].get("peak_mem_gb"),
            "ranks_in_sync": summary["ranks_in_sync"],
            "strategy": summary.get("strategy"),
            "world_size": summary["world_size"],
        }
    errors = [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]
    reason = (
        errors[0].removeprefix("facegen: error: ")
        if errors
        else f"exit {result.returncode}: " + result.stderr.strip().splitlines()[-1][:200]
    )
    return {"works": False, "reason": reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="one process per GPU (default: CPU processes)")
    parser.add_argument("--precision", default="no", help="--mixed_precision for every launch (bf16 on GPUs)")
    parser.add_argument("--images", type=int, default=1280, help="image budget per run")
    parser.add_argument("--batch", type=int, default=16, help="per-process batch")
    parser.add_argument("--strategies", nargs="*", default=STRATEGIES)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--smoke", action="store_true", help="32 px VAE and DCGAN under ddp and ds_zero2, 64 images")
    parser.add_argument("--json", metavar="PATH", help="also write the header and cells as JSON")
    args = parser.parse_args()
    methods = METHODS
    if args.smoke:
        methods, args.strategies, args.images, args.batch = SMOKE_METHODS, ["ddp", "ds_zero2"], 64, 8

    from facegen_dist.data.make_avatars import make_avatar_dataset

    scratch = scratch_dir()
    header = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": shlex.join(["python", *sys.argv]),
        "machine": "GPU" if args.gpu else f"{cpu_model()}, {os.cpu_count()} cores",
        "processes": args.processes,
    }
    print(
        f"{header['date']}; commit {header['commit']}; {header['machine']}; {args.processes} processes; `{header['command']}`"
    )
    print(f"{args.images} images per run, batch {args.batch} per process, --mixed_precision {args.precision}")
    print()
    print("| method | " + " | ".join(args.strategies) + " |")
    print("| --- | " + " | ".join("---" for _ in args.strategies) + " |")
    cells, datasets = [], {}
    for label, config, overrides in methods:
        resolution = next((int(o.split("=")[1]) for o in overrides if o.startswith("data.resolution=")), 64)
        if resolution not in datasets:
            datasets[resolution] = scratch / f"avatars{resolution}"
            make_avatar_dataset(
                datasets[resolution], num=400, size=resolution, seed=0, samples_per_shard=50, workers=2, progress=False
            )
        texts = []
        for strategy in args.strategies:
            run_dir = scratch / "runs"
            run_dir.mkdir(exist_ok=True)
            name = f"{config}-{strategy}"
            started = time.perf_counter()
            result = launch(strategy, config, overrides, args, datasets[resolution], run_dir, name)
            entry = {
                "method": label,
                "config": config,
                "strategy_config": strategy,
                "wall_s": time.perf_counter() - started,
                **cell(result, run_dir / name / "summary.json"),
            }
            cells.append(entry)
            if entry["works"]:
                sync = "" if entry["ranks_in_sync"] else ", RANKS DIFFER"
                texts.append(f"works: {entry['peak_mem_gb']:.2f} GB, {entry['img_per_s']:.0f} img/s{sync}")
            else:
                texts.append(f"refused: {entry['reason']}")
        print(f"| {label} | " + " | ".join(texts) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "cells": cells}, indent=1) + "\n")


if __name__ == "__main__":
    main()
