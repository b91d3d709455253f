"""Training throughput per method: img/s, where a step's time goes, MFU, and the ratio to a naive loop.

    python benchmarks/throughput.py                          # CPU, the 64 px configs
    python benchmarks/throughput.py --device cuda --configs vqgan_ffhq256 vqvae2_avatars256 --batch 8 [--compile]
Method (naive vs tuned, step split, FLOPs and MFU, --comm) and results: benchmarks/RESULTS.md, "Training throughput".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from setups import BASELINE, TINY_VQGAN, Levers, SegmentTimer, Setup, load_method, scratch_dir
from timing import best_of, cpu_model, git_commit
from torch.utils.flop_counter import FlopCounterMode

from facegen_dist.cluster.teardown import end_without_teardown
from facegen_dist.data.make_avatars import make_avatar_dataset
from facegen_dist.data.pipeline import StreamSpec, make_train_loader
from facegen_dist.data.shards import split_shards

CPU_CONFIGS = ["vae_avatars64", "vqvae2_avatars64", "vqgan_avatars64", "dcgan_avatars64", "introvae_avatars64"]
SMOKE = {
    "vae_avatars64": ["data.resolution=32", "model.channels=[8,16,16,32,32]", "model.latent_dim=16"],
    "vqgan_avatars64": TINY_VQGAN,
}
# Dense bf16 tensor-core peaks (vendor data sheets, no sparsity), by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}
# Assumed achievable all-reduce bus bandwidth (GB/s) for the scaling bound; a guess per interconnect, not a measurement.
BUS_GBPS = {"NVLink (8x H100, NVSwitch)": 350.0, "PCIe 4 x16 (no NVLink)": 20.0, "2 nodes, 200 Gb/s InfiniBand": 20.0}


MATMUL_SIDE = 1536


def matmul_rate(device: torch.device, repeats: int = 5) -> float:
    """Wall FLOP/s of a large fp32 matmul at the current thread count, the MEAN over `repeats` (the statistic the
    steps are timed with: a total over consecutive steps), so that a row and its peak see the machine alike."""
    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device), torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device)
    a @ b  # warm-up: first-call allocation and thread start
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * MATMUL_SIDE**3 * repeats / (time.perf_counter() - start)


def matmul_rate_per_cpu_second(repeats: int = 5) -> float:
    """FLOP per CPU-second of a 1-thread fp32 matmul: one core's practical peak, which a shared machine's load
    does not change (time.process_time counts only this process's CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
        a @ b
        start = time.process_time()
        for _ in range(repeats):
            a @ b
        return 2 * MATMUL_SIDE**3 * repeats / (time.process_time() - start)
    finally:
        torch.set_num_threads(threads)


def gpu_peak(device: torch.device, override_tflops: float) -> tuple[float, str] | None:
    """The data-sheet peak for MFU on CUDA (or the given one); None on CPU, where each row measures its own."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s dense bf16 ({key} data sheet)"
    raise SystemExit(f"throughput: no peak known for '{name}'; pass --peak-tflops")


CPU_PEAK_NOTE = (
    f"CPU: mfu = step FLOPs per CPU-second (process_time of the timed steps) / a 1-thread fp32 "
    f"{MATMUL_SIDE}^2 matmul's FLOP per CPU-second; mfu_wall = step FLOP/s / the mean wall rate of that "
    f"matmul at the run's threads, measured right before and after each row"
)


def shards_for(resolution: int, num: int, root: Path) -> Path:
    out = root / f"avatars{resolution}"
    if not (out / "manifest.json").exists():
        make_avatar_dataset(
            out,
            num=num,
            size=resolution,
            seed=0,
            samples_per_shard=64,
            workers=min(4, os.cpu_count() or 1),
            progress=False,
        )
    return out


def loader_rate(shards: Path, resolution: int, batch: int, workers: int, batches: int) -> float:
    spec = StreamSpec(tuple(split_shards(shards, "train")), resolution, batch, seed=0, num_workers=workers)
    iterator = iter(make_train_loader(spec))
    next(iterator)  # workers started, first shard open
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch * batches / (time.perf_counter() - start)


def step_flops(setup: Setup, images: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        setup.step(images)
    return counter.get_total_flops()


def measure(setup: Setup, data, warmup: int, steps: int) -> dict:
    device = setup.device
    for _ in range(warmup):
        setup.step(setup.inputs(next(data)["image"]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()  # img/s: unsynchronised steps, as training runs them
    for _ in range(steps):
        setup.step(setup.inputs(next(data)["image"]))
    sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    timer = SegmentTimer(device)  # the split: a second pass, synchronised at each boundary
    for _ in range(steps):
        with timer("data wait"):
            images = setup.inputs(next(data)["image"])
        setup.step(images, timer)
    split_total = sum(timer.seconds.values())
    return {
        "step_s": seconds / steps,
        "step_cpu_s": cpu_seconds / steps,
        "split": {k: v / split_total for k, v in timer.seconds.items()},
    }


def allreduce_worker(rank: int, world: int, port: int, sizes: dict[str, int], repeats: int, out: str) -> None:
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    seconds = {}
    for name, numel in sizes.items():
        buffer = torch.ones(numel, device=device)
        dist.all_reduce(buffer)  # warm-up
        seconds[name], _ = best_of(lambda: dist.all_reduce(buffer), device, repeats)
    if rank == 0:
        Path(out).write_text(json.dumps({"backend": backend, "seconds": seconds}))
    dist.barrier()
    dist.destroy_process_group()
    end_without_teardown(0)  # gloo's threads can abort the interpreter's teardown


def measure_allreduce(sizes: dict[str, int], repeats: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = scratch_dir() / "allreduce.json"
    mp.spawn(allreduce_worker, args=(2, port, sizes, repeats, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", nargs="*", help=f"shipped config names or paths (default on CPU: {' '.join(CPU_CONFIGS)})"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=0, help="per-process batch (0: each config's train.batch_size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--bf16", action="store_true", help="tuned row with bf16 autocast on CPU too (always on CUDA)")
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="tuned row with activation checkpointing (memory for speed)",
    )
    parser.add_argument("--compile", action="store_true", help="add a tuned + torch.compile row")
    parser.add_argument("--comm", action="store_true", help="measure the gradient all-reduce with 2 processes")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the device's peak for MFU (default: known GPUs' data sheet; CPU: measured per row)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny 32 px models, batch 4, 2 steps, for the tests")
    parser.add_argument("--json", metavar="PATH", help="also write the header and rows as JSON")
    args = parser.parse_args()
    configs = args.configs or CPU_CONFIGS
    overrides = {name: [] for name in configs}
    if args.smoke:
        configs, overrides = list(SMOKE), SMOKE
        args.batch, args.steps, args.warmup, args.workers = 4, 2, 1, 0

    device = torch.device(args.device)
    fixed_peak = gpu_peak(device, args.peak_tflops)
    peak_note = fixed_peak[1] if fixed_peak else CPU_PEAK_NOTE
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_model()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    header = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "device": name,
        "torch": torch.__version__,
        "peak": peak_note,
        "command": shlex.join(["python", *sys.argv]),
    }
    print(f"{header['date']}; commit {header['commit']}; {name}; torch {torch.__version__}; MFU peak {peak_note}")
    print(
        f"`{header['command']}`: {args.steps} timed steps after {args.warmup} warm-up; data from {args.workers} loader workers"
    )
    print()
    print(
        "| config | px | batch | params (M) | loop | img/s | x naive | data / fwd / bwd / optim % | GFLOP/img | MFU % | "
        "MFU % (wall) | loader img/s | loader / step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    tuned = Levers(
        bf16=args.bf16 or device.type == "cuda",
        channels_last=True,
        fused_optimizer=True,
        activation_checkpointing=args.activation_checkpointing,
    )
    loops = [BASELINE, tuned] + ([Levers(**{**tuned.__dict__, "compile": True})] if args.compile else [])
    scratch, rows, grad_sizes = scratch_dir(), [], {}
    for config in configs:
        cfg, method = load_method(config, overrides.get(config, []), scratch)
        resolution, batch = cfg.data.resolution, args.batch or cfg.train.batch_size
        shards = shards_for(resolution, max(256, batch * 8), scratch)
        spec = StreamSpec(tuple(split_shards(shards, "train")), resolution, batch, seed=0, num_workers=args.workers)
        data = iter(make_train_loader(spec))
        loader = loader_rate(shards, resolution, batch, args.workers, max(4, args.steps))
        naive_rate = None
        for levers in loops:
            setup = Setup(cfg, method, device, levers)
            flops = step_flops(setup, setup.inputs(next(data)["image"]))
            peak_before = None if fixed_peak else matmul_rate(device)
            result = measure(setup, data, args.warmup, args.steps)
            rate = batch / result["step_s"]
            if fixed_peak:
                mfu, mfu_wall, peaks = flops / result["step_s"] / fixed_peak[0], None, {}
            else:
                # Wall FLOP/s against a wall peak is at the mercy of the machine's other load during either; CPU time
                # against a 1-thread peak per CPU-second is not (but counts spinning threads as used), so it is `mfu`.
                wall_peak = (peak_before + matmul_rate(device)) / 2
                per_cpu_second = matmul_rate_per_cpu_second()
                mfu, mfu_wall = flops / result["step_cpu_s"] / per_cpu_second, flops / result["step_s"] / wall_peak
                peaks = {"peak_wall_gflops": wall_peak / 1e9, "peak_gflops_per_cpu_s": per_cpu_second / 1e9}
            naive_rate = naive_rate or rate
            split = result["split"]
            row = {
                "config": config,
                "resolution": resolution,
                "batch": batch,
                "params_m": setup.num_params() / 1e6,
                "loop": levers.label(),
                "img_per_s": rate,
                "ratio_to_naive": rate / naive_rate,
                "split": split,
                "gflop_per_image": flops / batch / 1e9,
                "mfu": mfu,
                "mfu_wall": mfu_wall,
                "step_cpu_s": result["step_cpu_s"],
                **peaks,
                "loader_img_per_s": loader,
                "loader_over_step": loader / rate,
            }
            rows.append(row)
            shares = " / ".join(
                f"{100 * split.get(k, 0):.0f}" for k in ("data wait", "forward", "backward", "optimizer")
            )
            print(
                f"| {config} | {resolution} | {batch} | {row['params_m']:.2f} | {row['loop']} | {rate:.1f} | {row['ratio_to_naive']:.2f} | {shares} | "
                f"{row['gflop_per_image']:.2f} | {100 * row['mfu']:.1f} | {'-' if mfu_wall is None else f'{100 * mfu_wall:.1f}'} | "
                f"{loader:.0f} | {row['loader_over_step']:.1f} |",
                flush=True,
            )
            grad_sizes[config] = (setup.num_params(), result["step_s"])
            del setup
        shutdown = getattr(data, "_shutdown_workers", None)
        if shutdown:
            shutdown()

    comm = None
    if args.comm:
        comm = measure_allreduce(
            {config: numel for config, (numel, _) in grad_sizes.items()}, repeats=3 if args.smoke else 10
        )
        print()
        print(
            f"All-reduce of one step's gradients (fp32), 2 processes, {comm['backend']}; scaling bound assumes no overlap with backward:"
        )
        print()
        # The efficiency bound needs the GPU's step time: on CPU only the all-reduce times are printed.
        with_efficiency = device.type == "cuda"
        fabrics = " | ".join(f"8 GPUs, {fabric}: ms{' (eff. %)' if with_efficiency else ''}" for fabric in BUS_GBPS)
        print(
            f"| config | MB/step | measured ms, 2 proc. | tuned step ms, this device | all-reduce / step % | {fabrics} |"
        )
        print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in BUS_GBPS) + " |")
        for config, (numel, step_s) in grad_sizes.items():
            megabytes, measured = numel * 4 / 1e6, comm["seconds"][config]
            cells = []
            for bandwidth in BUS_GBPS.values():
                seconds = 2 * 7 / 8 * numel * 4 / (bandwidth * 1e9)  # ring all-reduce: 2(N-1)/N of the bytes per GPU
                cells.append(
                    f"{1e3 * seconds:.2f}" + (f" ({100 * step_s / (step_s + seconds):.0f})" if with_efficiency else "")
                )
            print(
                f"| {config} | {megabytes:.1f} | {1e3 * measured:.2f} | {1e3 * step_s:.1f} | {100 * measured / step_s:.1f} | {' | '.join(cells)} |"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"header": header, "rows": rows, "allreduce": comm, "assumed_bus_gbps": BUS_GBPS}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
