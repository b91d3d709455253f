"""The GPU figures in one command, <= 8 minutes on one CUDA GPU with no package registry.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_<date>.json [--peers DIR]
    python benchmarks/gpu_check.py --device cpu --smoke --out /tmp/gpu_check.json    # the same paths, tiny (tests)
The GPU session (`bash benchmarks/gpu_prepare.sh` first) and the stages: benchmarks/RESULTS.md, "GPU figures".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# Each stage's wall budget in seconds on the GPU (their sum, with start-up, stays under 8 minutes; --total-s caps it).
BUDGET_S = {
    "train_vae": 75,
    "train_vqgan": 75,
    "memory": 80,
    "peers_vqgan": 95,
    "peers_vqvae2": 55,
    "eval": 35,
    "compile": 120,
}
STAGES = list(BUDGET_S)
SMOKE_BUDGET_S = 240  # per stage on a shared 2-core CPU

# The peers' architectures in this project's keys (check: /work/shared/peers/README.md, "Architecture settings").
# taming learns its codebook by Adam from a uniform init (no k-means, no restarts): 72.142 M generator parameters.
TAMING_FACESHQ = ("vqgan_ffhq256", ["model.codebook_update=loss", "model.kmeans_init=false", "model.dead_code_steps=0"])
# rosinality's VQVAE() defaults: EMA codebooks (decay 0.99) from a random init, the narrow top encoder: 1.389 M.
ROSINALITY = (
    "vqvae2_avatars256",
    ["model.top_encoder_channels=64", "model.kmeans_init=false", "model.dead_code_steps=0"],
)
SMOKE_VQGAN = (
    "vqgan_avatars64",
    [
        "data.resolution=32",
        "model.channels=16",
        "model.channel_mult=[1,2,2]",
        "model.res_blocks=1",
        "model.attn_resolutions=[8]",
        "model.z_channels=16",
        "model.embed_dim=16",
        "model.num_codes=64",
        "model.perceptual=tiny",
        "model.disc_channels=16",
    ],
)
SMOKE_VAE = ["data.resolution=32", "model.channels=[8,16,16,32,32]", "model.latent_dim=16"]
# The 93 s: bench_peers.py --peer taming_vqgan --res 32 --batch 1 --steps 1 --warmup 1 on the 2-core CPU.
TAMING_SMOKE_SKIP = (
    "skipped in --smoke: taming's 67 M-parameter model took 93 s for 2 steps at 32 px on the 2-core CPU (> 30 s)"
)


def one_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- the driver


def run_stage(name: str, args, scratch: Path, timeout: float, extra: dict) -> dict:
    """One stage in a child process (its own session, so a timeout kills its children too); its result file,
    rewritten by the stage as it goes, is read whatever happened."""
    result_file = scratch / f"stage-{name}.json"
    result_file.unlink(missing_ok=True)
    (scratch / f"stage-{name}-extra.json").write_text(json.dumps(extra))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stage",
        name,
        "--scratch",
        str(scratch),
        "--device",
        args.device,
        "--peers",
        str(args.peers),
        "--cap-gb",
        str(args.cap_gb),
        "--eval-num",
        str(args.eval_num),
    ] + (["--smoke"] if args.smoke else [])
    start = time.perf_counter()
    log_path = scratch / f"stage-{name}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode, timed_out = process.wait(), True
    seconds = time.perf_counter() - start
    tail = log_path.read_text(errors="replace")[-2000:]
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if timed_out:
        result.update(
            status="timeout",
            error=f"{name}: still running after its {timeout:.0f} s budget; killed (results so far kept)",
            stderr_tail=tail,
        )
    elif returncode != 0 or result.get("status") != "ok":
        result.update(
            status="error",
            error=result.get("error") or f"{name}: exit {returncode}: {one_line(tail)}",
            stderr_tail=tail,
        )
    result.update(seconds=round(seconds, 1), budget_s=round(timeout))
    return result


def header(args) -> dict:
    import torch
    from timing import cpu_model, git_commit

    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else cpu_model()
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "command": shlex.join(["python", *sys.argv]),
        "peers": str(args.peers),
    }


def drive(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="facegen-gpu-check-"))
    report = {"header": header(args), "stages": {}}
    write_json(out, report)
    deadline = time.perf_counter() + args.total_s
    for name in args.stages:
        left = deadline - time.perf_counter()
        if left < 10:
            report["stages"][name] = {
                "status": "skipped",
                "error": f"{name}: skipped, the run's {args.total_s:.0f} s are spent",
            }
        else:
            budget = SMOKE_BUDGET_S if args.smoke else BUDGET_S[name]
            extra = {
                "peer_cells": report["stages"].get("peers_vqgan", {}).get("cells", [])
                + report["stages"].get("peers_vqvae2", {}).get("cells", [])
            }
            print(f"gpu_check: {name} (budget {min(budget, left):.0f} s)", flush=True)
            report["stages"][name] = run_stage(name, args, scratch, min(budget, left), extra)
        stage = report["stages"][name]
        print(
            f"gpu_check: {name}: {stage['status']}"
            + (f" ({stage['error']})" if stage.get("error") else "")
            + (f" in {stage['seconds']} s" if "seconds" in stage else ""),
            flush=True,
        )
        write_json(out, report)
    print(f"gpu_check: wrote {out}")


# ---------------------------------------------------------------------------------------- stage helpers


class StageReport:
    """The stage's result dict, rewritten to its file at every update."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"status": "running"}

    def update(self, **values) -> None:
        self.data.update(values)
        write_json(self.path, self.data)


def finite_numbers(tree) -> bool:
    if isinstance(tree, dict):
        return all(finite_numbers(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(finite_numbers(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = {k: v for row in rows for k, v in row.items() if "loss" in k and isinstance(v, (int, float))}
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    return {
        "steps": summary["steps"],
        "images_seen": summary["images_seen"],
        "mixed_precision": summary["mixed_precision"],
        "img_per_s_mean": summary["img_per_s_mean"],
        "train_seconds": summary["train_seconds"],
        "skipped_steps": summary["skipped_steps"],
        "metrics_rows": len(rows),
        "first_logged_step": rows[0]["step"] if rows else None,
        "losses_finite": bool(rows)
        and all(
            math.isfinite(v) for row in rows for k, v in row.items() if "loss" in k and isinstance(v, (int, float))
        ),
        "final_losses": {k: v for k, v in summary.get("final", {}).items() if "loss" in k} or losses,
        "peak_mem_gb": max((row.get("peak_mem_gb", 0.0) for row in rows), default=0.0),
        "checkpoint": checkpoints[-1].name if checkpoints else None,
        "checkpoint_files": sorted(p.name for p in checkpoints[-1].iterdir()) if checkpoints else [],
    }


def train_and_resume(
    label: str, base: list[str], first_images: int, total_images: int, runs: Path, device: str
) -> dict:
    """A short run to `first_images` with a checkpoint at its end, then the same run.name to `total_images`."""
    common = [
        *base,
        f"run.dir={runs}",
        f"run.name={label}",
        "log.wandb=off",
        "log.progress=false",
        "log.num_grid_images=8",
        "train.sample_every_images=100000000",
        "eval.every_images=0",
        "optim.warmup_images=0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    result = {"overrides": base}
    for part, images in (("first", first_images), ("resume", total_images)):
        overrides = [
            *common,
            f"train.total_images={images}",
            f"train.ckpt_every_images={images}",
            f"train.log_every_images={max(1, images // 8)}",
        ]
        start = time.perf_counter()
        process = subprocess.run(
            train_command(overrides), capture_output=True, text=True, cwd=REPO, env=env, timeout=600
        )
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(
                f"{label} {part}: train.py exit {process.returncode}: {one_line(process.stderr or process.stdout)}"
            )
        run = read_run(runs / label)
        run.update(wall_s=round(seconds, 1), resumed="resumed from" in process.stdout + process.stderr)
        result[part] = run
    first, resumed = result["first"], result["resume"]
    result["resume_continues"] = bool(
        resumed["resumed"]
        and resumed["steps"] > first["steps"]
        and resumed["images_seen"] == total_images
        and first["checkpoint"] is not None
    )
    result["levers"] = {
        "precision": first["mixed_precision"],
        "channels_last": True,
        "fused_adamw": device == "cuda",
        "pinned_memory": device == "cuda",
        "grad_scaler_state": "scaler.pt" in first["checkpoint_files"],
    }
    result["ok"] = bool(
        first["losses_finite"] and resumed["losses_finite"] and first["steps"] > 0 and result["resume_continues"]
    )
    return result


def stage_train(which: str, args, report: StageReport) -> None:
    from setups import random_vgg16_weights

    scratch = Path(args.scratch)
    runs, data = scratch / "runs", scratch / "data"
    data_common = [
        f"data.cache_dir={data}",
        "data.path=embedded:avatars",
        "data.num_workers=2",
        "train.channels_last=true",
    ]
    if which == "vae":
        if args.smoke:
            base = [*data_common, *SMOKE_VAE, "data.make_size=32", "data.make_num=96", "train.batch_size=8"]
            first, total = 16, 32
        else:
            base = [*data_common, "data.make_num=1024", "train.batch_size=64"]
            first, total = 1280, 2560
        cases = [("vae_bf16", [*base, "train.precision=bf16"]), ("vae_fp16", [*base, "train.precision=fp16"])]
    else:
        if args.smoke:
            config, model = SMOKE_VQGAN
            base = [
                "--config",
                str(REPO / "configs" / f"{config}.yaml"),
                *data_common,
                *model,
                "data.make_size=32",
                "data.make_num=96",
                "train.batch_size=4",
                "model.disc_start_images=4",
            ]
            first, total = 8, 16
        else:
            # no download there: LPIPS costs the same with any weights
            base = [
                "--config",
                str(REPO / "configs" / "vqgan_ffhq256.yaml"),
                *data_common,
                "data.make_size=256",
                "data.resolution=256",
                "data.make_num=128",
                "train.batch_size=4",
                "model.disc_start_images=32",
                f"model.perceptual_weights={random_vgg16_weights(scratch)}",
            ]
            first, total = 48, 96
        cases = [("vqgan_bf16", [*base, "train.precision=bf16"])]
    runs_done = {}
    for label, overrides in cases:
        try:
            runs_done[label] = train_and_resume(label, overrides, first, total, runs, args.device)
        except Exception as error:  # noqa: BLE001 — one case's failure is recorded, the next case still runs
            runs_done[label] = {"ok": False, "error": one_line(str(error))}
        report.update(runs=runs_done)
    failed = [label for label, run in runs_done.items() if not run.get("ok")]
    report.update(
        status="ok" if not failed else "error", error=f"train_{which}: failed: {', '.join(failed)}" if failed else None
    )


def stage_memory(args, report: StageReport) -> None:
    out = Path(args.scratch) / "memory.json"
    if args.smoke:  # CPU: the estimate path only (a measured peak needs CUDA)
        command = ["--smoke", "--cases", "VQ-GAN 32", "--levers", "bf16+ckpt", "--batches", "1", "2"]
    else:
        command = [
            "--device",
            "cuda",
            "--cap-gb",
            str(args.cap_gb),
            "--cases",
            "VQ-GAN 512",
            "--batches",
            "1",
            "2",
            "4",
            "8",
            "--max-batch",
            "64",
        ]
    command = [sys.executable, str(HERE / "memory.py"), *command, "--json", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    for line in process.stdout:  # the table as it comes, and its JSON (written after every row) into the report
        print(line, end="", flush=True)
        if out.exists():
            report.update(memory=json.loads(out.read_text()), command=shlex.join(command))
    if process.wait() != 0:
        raise RuntimeError(f"memory.py exit {process.returncode}")
    rows = json.loads(out.read_text())["rows"]
    report.update(memory={"rows": rows}, status="ok")


# ------------------------------------------------------------------------------------- peers and compile


def project_cell(
    config: str,
    overrides: list[str],
    batch: int,
    bf16: bool,
    compile_: bool,
    device,
    warmup: int,
    steps: int,
    scratch: Path,
) -> dict:
    """The project's step at one cell, timed as bench_peers.py times the peers: synchronised perf_counter per step,
    median; one synthetic batch on the device (no loader). Then the split (synchronised segments) and FLOPs."""
    import torch
    from setups import Levers, SegmentTimer, Setup, load_method
    from throughput import GPU_PEAK_TFLOPS, matmul_rate_per_cpu_second, step_flops

    cfg, method = load_method(config, overrides, scratch)
    levers = Levers(bf16=bf16, channels_last=True, fused_optimizer=True, compile=compile_)
    setup = Setup(cfg, method, device, levers)
    resolution = cfg.data.resolution
    images = setup.inputs(
        torch.randint(
            0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, cpu_times = [], []
    start_all = time.perf_counter()
    for index in range(warmup + steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        setup.step(images)
        sync()
        if index >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        elif index == 0:
            first_step_s = time.perf_counter() - start  # with compile: the compilation
    timer = SegmentTimer(device)
    for _ in range(steps):
        setup.step(images, timer)
    total = sum(timer.seconds.values())
    flops = step_flops(setup, images) if not compile_ else None  # the counter does not see inside compiled graphs
    median = statistics.median(times)
    cell = {
        "img_per_s": batch / median,
        "step_ms_median": 1e3 * median,
        "step_ms_all": [round(1e3 * t, 2) for t in times],
        "split": {k: v / total for k, v in timer.seconds.items()},
        "first_step_s": first_step_s,
        "wall_s_incl_warmup": time.perf_counter() - start_all,
        "levers": levers.label(),
        "params_m": sum(p.numel() for m in setup.modules.values() for p in m.parameters() if p.requires_grad) / 1e6,
    }
    if flops is not None:
        cell["gflop_per_image"] = flops / batch / 1e9
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)
            cell["mfu"] = flops / median / (peak * 1e12) if peak else None
            cell["mfu_peak"] = (
                f"{peak:g} TFLOP/s dense bf16 ({name} data sheet)" if peak else f"no peak known for {name}"
            )
        else:
            cell["mfu"] = flops / statistics.median(cpu_times) / matmul_rate_per_cpu_second()
            cell["mfu_peak"] = "CPU time against a 1-thread fp32 matmul's FLOP per CPU-second (throughput.py)"
    if device.type == "cuda":
        cell["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del setup
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cell


def peer_cell(
    peers: Path, peer: str, res: int, batch: int, precision: str, device: str, warmup: int, steps: int
) -> dict:
    command = [
        sys.executable,
        str(peers / "bench_peers.py"),
        "--peer",
        peer,
        "--res",
        str(res),
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--device",
        device,
        "--precision",
        precision,
    ]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if process.returncode != 0:
        raise RuntimeError(f"bench_peers.py {peer} exit {process.returncode}: {one_line(process.stderr)}")
    line = json.loads(process.stdout.strip().splitlines()[-1])
    return {
        k: line[k]
        for k in (
            "img_per_s",
            "step_ms_median",
            "step_ms_all",
            "peak_mem_mb",
            "params_m",
            "params_M",
            "final_losses",
            "device_name",
            "torch",
        )
        if k in line
    }


def peer_plan(model: str, smoke: bool):
    """(peer name, project (config, overrides), res, batches, precisions, warmup, steps)."""
    if model == "vqgan":
        if smoke:
            return "taming_vqgan", SMOKE_VQGAN, 32, [2], ["fp32"], 1, 1
        return "taming_vqgan", TAMING_FACESHQ, 256, [4, 16], ["fp32", "bf16"], 3, 8
    if smoke:
        return "rosinality_vqvae2", (ROSINALITY[0], [*ROSINALITY[1], "data.resolution=32"]), 32, [2], ["fp32"], 1, 1
    return "rosinality_vqvae2", ROSINALITY, 256, [4, 16], ["fp32", "bf16"], 3, 10


def stage_peers(model: str, args, report: StageReport) -> None:
    import torch

    device, scratch, peers = torch.device(args.device), Path(args.scratch), Path(args.peers)
    peer, (config, overrides), res, batches, precisions, warmup, steps = peer_plan(model, args.smoke)
    peer_note = None
    if not (peers / "bench_peers.py").is_file():
        peer_note = f"skipped: no peers folder ({peers}/bench_peers.py not found)"
    elif args.smoke and peer == "taming_vqgan":
        peer_note = TAMING_SMOKE_SKIP
    report.update(
        peer=peer,
        project_config=config,
        project_overrides=overrides,
        resolution=res,
        peer_status=peer_note or "run",
        timing="median of synchronised per-step times after warm-up, both sides; one synthetic batch on the device",
    )
    cells = [
        {"model": model, "peer": peer, "batch": b, "precision": p, "project": [], "peer_runs": []}
        for b in batches
        for p in precisions
    ]
    for round_index in range(2):  # interleaved: every cell's project then peer, twice, so a drift hits both sides
        for cell in cells:
            cell["project"].append(
                project_cell(
                    config, overrides, cell["batch"], cell["precision"] == "bf16", False, device, warmup, steps, scratch
                )
            )
            report.update(cells=cells)
            if peer_note is None:
                cell["peer_runs"].append(
                    peer_cell(peers, peer, res, cell["batch"], cell["precision"], args.device, warmup, steps)
                )
            summarise(cell)
            report.update(cells=cells)
    report.update(status="ok")


def summarise(cell: dict) -> None:
    cell["project_img_per_s"] = statistics.median(run["img_per_s"] for run in cell["project"])
    if cell.get("peer_runs"):
        cell["peer_img_per_s"] = statistics.median(run["img_per_s"] for run in cell["peer_runs"])
        cell["ratio_project_over_peer"] = cell["project_img_per_s"] / cell["peer_img_per_s"]
    mfus = [run["mfu"] for run in cell["project"] if run.get("mfu") is not None]
    if mfus:
        cell["project_mfu"] = statistics.median(mfus)


def stage_compile(args, report: StageReport) -> None:
    import torch

    device, scratch = torch.device(args.device), Path(args.scratch)
    extra = json.loads((Path(args.scratch) / "stage-compile-extra.json").read_text())
    peer_rates = {(c["model"], c["batch"], c["precision"]): c.get("peer_img_per_s") for c in extra["peer_cells"]}
    eager_rates = {(c["model"], c["batch"], c["precision"]): c.get("project_img_per_s") for c in extra["peer_cells"]}
    cells = []
    # The cheap compile first; smoke compiles only that one (inductor needs ~144 s for the tiny VQ-VAE2 on 2 CPU cores).
    for model in ("vqvae2",) if args.smoke else ("vqvae2", "vqgan"):
        _, (config, overrides), _, batches, _, warmup, steps = peer_plan(model, args.smoke)
        for batch in batches:
            # bf16 is the setting a GPU trains with; fp32 on CPU (no native bf16)
            precision = "fp32" if args.smoke else "bf16"
            run = project_cell(config, overrides, batch, precision == "bf16", True, device, warmup, steps, scratch)
            cell = {
                "model": model,
                "batch": batch,
                "precision": precision,
                "project": run,
                "project_img_per_s": run["img_per_s"],
                "compile_first_step_s": run["first_step_s"],
            }
            key = (model, batch, precision)
            if peer_rates.get(key):
                cell["ratio_project_over_peer"] = run["img_per_s"] / peer_rates[key]
            if eager_rates.get(key):
                cell["speedup_over_eager"] = run["img_per_s"] / eager_rates[key]
            cells.append(cell)
            report.update(cells=cells)
    report.update(status="ok")


def stage_eval(args, report: StageReport) -> None:
    import torch

    from facegen_dist.config import load_config
    from facegen_dist.eval.extractors import build_extractor
    from facegen_dist.eval.features import chunk_bounds, to_uint8
    from facegen_dist.eval.metrics import compute_feature_metric, feature_statistics
    from facegen_dist.runs import build_method

    device = torch.device(args.device)
    num = 200 if args.smoke else args.eval_num
    # The default 64 px VAE (the avatars' generator); an untrained one samples as fast as a trained one.
    cfg = load_config([], ["eval.extractor=avatar"])
    method = build_method(cfg.model, cfg.data.resolution)
    modules = {name: module.to(device).eval() for name, module in method.build_modules().items()}
    extractor = build_extractor(cfg.eval, ["fid", "kid", "prc"], device, "avatars")
    seconds = {"generate": 0.0, "features": 0.0}
    features = []
    for chunk, (start, end) in enumerate(chunk_bounds(num, cfg.eval.batch_size)):
        tick = time.perf_counter()
        with torch.no_grad():
            images = to_uint8(method.sample(modules, end - start, torch.Generator().manual_seed(chunk)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds["generate"] += time.perf_counter() - tick
        tick = time.perf_counter()
        features.append(extractor(images)[extractor.layers["fid"]])
        seconds["features"] += time.perf_counter() - tick
    features = torch.cat(features)
    reference = features.roll(1, 0)  # stands in for a dataset's reference features (computed once, then cached)
    values = {}
    for metric in ("fid", "kid", "prc"):
        tick = time.perf_counter()
        result = compute_feature_metric(
            metric, features, reference, feature_statistics(reference) if metric == "fid" else None, seed=0
        )
        seconds[metric] = time.perf_counter() - tick
        values[metric] = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
    report.update(
        num_samples=num,
        resolution=cfg.data.resolution,
        extractor=extractor.name,
        feature_dim=int(features.shape[1]),
        timings_s={k: round(v, 3) for k, v in seconds.items()},
        total_s=round(sum(seconds.values()), 3),
        metric_values_meaningless=values,
        status="ok",
        note="untrained VAE's samples against their own features rolled by one: real times, meaningless values",
    )


def stage_main(args) -> None:
    report = StageReport(Path(args.scratch) / f"stage-{args.stage}.json")
    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
        {
            "train_vae": lambda: stage_train("vae", args, report),
            "train_vqgan": lambda: stage_train("vqgan", args, report),
            "memory": lambda: stage_memory(args, report),
            "peers_vqgan": lambda: stage_peers("vqgan", args, report),
            "peers_vqvae2": lambda: stage_peers("vqvae2", args, report),
            "eval": lambda: stage_eval(args, report),
            "compile": lambda: stage_compile(args, report),
        }[args.stage]()
        if not finite_numbers(report.data):
            report.update(status="error", error=f"{args.stage}: a figure is not finite")
    except Exception as error:  # noqa: BLE001 — recorded in one line, the traceback goes to the stage's log
        traceback.print_exc()
        report.update(status="error", error=f"{args.stage}: {type(error).__name__}: {one_line(str(error))}")
        sys.exit(1)
    sys.exit(0 if report.data.get("status") == "ok" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the JSON report (rewritten after every stage)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny 32 px models, 1-2 steps, small N: the same code paths on CPU"
    )
    parser.add_argument(
        "--peers",
        default=str(REPO.parent / "shared" / "peers"),
        help="folder holding bench_peers.py (default ../shared/peers)",
    )
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=STAGES)
    parser.add_argument(
        "--total-s",
        type=float,
        default=0.0,
        help="wall budget of all stages together (default 465 s; --smoke: 7 stages x their budget)",
    )
    parser.add_argument("--cap-gb", type=float, default=8.0, help="memory stage: the emulated card's size")
    parser.add_argument("--eval-num", type=int, default=10_000, help="eval stage: samples (smoke: 200)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Smoke stages start real processes on a shared 2-core CPU, where the GPU run's 465 s would stop the 5th one.
    args.total_s = args.total_s or (SMOKE_BUDGET_S * len(STAGES) if args.smoke else 465.0)
    if args.stage:
        stage_main(args)
    elif not args.out:
        parser.error("--out is required")
    else:
        drive(args)


if __name__ == "__main__":
    main()
