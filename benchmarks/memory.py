"""Training memory per GPU for VAE, VQ-VAE2 and VQ-GAN at 256 and 512 px, per memory lever and per strategy.

    python benchmarks/memory.py                      # CPU: the estimate, from measured saved activations
    python benchmarks/memory.py --device cuda --cap-gb 8 --batch 8    # GPU: real peaks under an 8 GB cap, beside the estimate
The two kinds of figure (measured, estimate) and what the estimate leaves out: benchmarks/RESULTS.md, "Memory per GPU".
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from setups import TINY_VQGAN, Levers, Setup, load_method, scratch_dir
from timing import cpu_model, git_commit

from facegen_dist.train.activation_checkpointing import retained_activation_bytes

GB = 2**30
# (label, config, overrides): the shipped configs at their resolution; the VAE family at 512 is the 256 config one level deeper.
CASES = [
    ("VAE 256", "vae_cartoonset256", []),
    ("VAE 512", "vae_cartoonset256", ["data.resolution=512", "model.channels=[32,64,128,256,512,512,512,512]"]),
    ("VQ-VAE2 256", "vqvae2_avatars256", []),
    ("VQ-VAE2 512", "vqvae2_ffhq512", []),
    ("VQ-GAN 256", "vqgan_ffhq256", []),
    ("VQ-GAN 512", "vqgan_ffhq512", []),
]
SMOKE_CASES = [
    ("VAE 32", "vae_avatars64", ["data.resolution=32", "model.channels=[8,16,16,32,32]", "model.latent_dim=16"]),
    (
        "VQ-VAE2 32",
        "vqvae2_avatars64",
        [
            "data.resolution=32",
            "model.channels=16",
            "model.res_blocks=1",
            "model.res_channels=8",
            "model.embed_dim=8",
            "model.num_codes=32",
            "model.downsample=4",
        ],
    ),
    (
        "VQ-GAN 32",
        "vqgan_avatars64",
        TINY_VQGAN,
    ),
]
LEVERS = [
    Levers(),
    Levers(bf16=True),
    Levers(activation_checkpointing=True),
    Levers(bf16=True, activation_checkpointing=True),
]
LEVER_NAMES = {"fp32": LEVERS[0], "bf16": LEVERS[1], "ckpt": LEVERS[2], "bf16+ckpt": LEVERS[3]}
STRATEGIES = ("ddp", "zero1", "zero2", "zero3_offload")


def write_json_atomically(path: Path, record: dict) -> None:
    """Written beside and renamed: gpu_check.py reads the file while rows are still coming."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    temporary.replace(path)


def retained_per_image(setup: Setup, images: torch.Tensor) -> int:
    """The largest phase's retained activation bytes per image (forward only: backward frees them)."""
    worst = 0
    batch = setup.batch(images)  # one batch through every phase: a discriminator scores the generator's fakes
    for phase in setup.phases:
        if not setup.method.phase_active(phase.name, setup.images_seen):
            continue
        with setup.autocast():
            _, retained = retained_activation_bytes(lambda: setup.method.loss(phase.name, setup.modules, batch)[0])
        worst = max(worst, retained)
    return worst // images.shape[0]


def estimate_gb(setup: Setup, activations_per_image: int, batch: int, strategy: str, gpus: int) -> float | None:
    trainable = sum(p.numel() for module in setup.modules.values() for p in module.parameters())
    frozen = (
        sum(p.numel() for p in setup.method.perceptual.parameters())
        if getattr(setup.method, "perceptual", None) is not None
        else 0
    )
    per_param_weights = 4 + (2 if setup.levers.bf16 else 0)  # fp32 master + autocast's bf16 copy
    weights, grads, adam = trainable * per_param_weights, trainable * 4, trainable * 8
    if strategy != "ddp" and len(setup.phases) > 1:
        return None  # DeepSpeed runs one-optimizer methods only
    if strategy == "zero1":
        adam /= gpus
    elif strategy == "zero2":
        grads, adam = grads / gpus, adam / gpus
    elif strategy == "zero3_offload":
        weights, grads, adam = weights / gpus, grads / gpus, 0
    return (weights + grads + adam + frozen * per_param_weights + activations_per_image * batch) / GB


def measured_peak_gb(setup: Setup, images: torch.Tensor) -> float | str:
    device = setup.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(2):
            setup.step(images)
    except torch.OutOfMemoryError:
        return "OOM"
    return torch.cuda.max_memory_allocated(device) / GB


def largest_fitting_batch(setup: Setup, resolution: int, measured: dict[int, float | str], limit: int) -> int:
    """The largest micro-batch whose two real steps fit the cap: from the batches measured, doubling past the
    largest that fits until one does not (or `limit`), then bisecting between the two. 0 if batch 1 does not fit."""

    def fits(batch: int) -> bool:
        if batch not in measured:
            images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
            measured[batch] = measured_peak_gb(setup, setup.inputs(images))
        return not isinstance(measured[batch], str)

    fitting = [b for b, peak in measured.items() if not isinstance(peak, str)]
    low = max(fitting, default=0)
    failing = [b for b, peak in measured.items() if isinstance(peak, str) and b > low]
    high = min(failing, default=0)
    if not high:  # nothing failed above the best fit yet: double until something does
        low = low or (1 if fits(1) else 0)
        if not low:
            return 0
        high = low * 2
        while high <= limit and fits(high):
            low, high = high, high * 2
        if high > limit:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def measure_row(label: str, config: str, overrides: list[str], levers: Levers, args: dict) -> dict | None:
    device = torch.device(args["device"])
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args["cap_gb"] * GB / total), device)
    cfg, method = load_method(config, overrides, scratch_dir())
    if levers.activation_checkpointing and not method.checkpoint_blocks():
        return None
    resolution = cfg.data.resolution
    setup = Setup(cfg, method, device, levers)
    probe = torch.rand(args["probe_batch"], 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    per_image = retained_per_image(setup, setup.inputs((probe * 255).to(torch.uint8)))
    estimates = {s: estimate_gb(setup, per_image, args["batch"], s, args["gpus"]) for s in STRATEGIES}
    fixed_gb = estimate_gb(setup, 0, 0, "ddp", args["gpus"])
    row = {
        "model": label,
        "config": config,
        "overrides": overrides,
        "resolution": resolution,
        "params_m": setup.num_params() / 1e6,
        "levers": levers.label(),
        "activation_mb_per_image": per_image / 2**20,
        "estimate_gb": estimates,
        "max_batch_in_cap": max(0, int((args["cap_gb"] - fixed_gb) * GB // max(per_image, 1))),
    }
    batches = args.get("batches") or []
    if batches:
        row["estimate_gb_by_batch"] = {b: estimate_gb(setup, per_image, b, "ddp", args["gpus"]) for b in batches}
    if device.type == "cuda":
        measured: dict[int, float | str] = {}
        for batch_size in dict.fromkeys([args["batch"], *batches]):
            batch = torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8)
            measured[batch_size] = measured_peak_gb(setup, setup.inputs(batch))
        row["measured_peak_gb"] = measured[args["batch"]]
        if batches:
            row["measured_peak_gb_by_batch"] = {b: measured[b] for b in batches}
        if args.get("max_batch"):
            row["max_batch_measured"] = largest_fitting_batch(setup, resolution, measured, args["max_batch"])
            row["measured_peak_gb_search"] = dict(sorted(measured.items()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="per-GPU batch the figures are for")
    parser.add_argument("--gpus", type=int, default=8, help="N for the ZeRO columns")
    parser.add_argument(
        "--cap-gb",
        type=float,
        default=8.0,
        help="the per-GPU budget: GPU mode caps the process at it; the max-batch column uses it",
    )
    parser.add_argument(
        "--probe-batch", type=int, default=1, help="images in the measured forward (the activation term is per image)"
    )
    parser.add_argument("--cases", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--levers", nargs="*", choices=list(LEVER_NAMES), help="lever rows to run (default: all)")
    parser.add_argument(
        "--batches",
        nargs="*",
        type=int,
        default=[],
        help="also these micro-batches: the ddp estimate for each and, on CUDA, the measured peak",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        metavar="LIMIT",
        help="CUDA: search the largest micro-batch that fits --cap-gb (up to LIMIT), measuring each tried",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny 32 px models, batch 2, for the tests")
    parser.add_argument("--json", metavar="PATH", help="also write the header and rows as JSON")
    args = parser.parse_args()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.batch, args.probe_batch = 2, 2
    if args.cases:
        cases = [case for case in cases if case[0] in args.cases]
        if not cases:
            raise SystemExit(
                f"memory: no case among {args.cases}; known: {', '.join(label for label, _, _ in (SMOKE_CASES if args.smoke else CASES))}"
            )

    device = torch.device(args.device)
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} capped at {args.cap_gb:g} GB"
    else:
        name = f"{cpu_model()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    header = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "device": name,
        "torch": torch.__version__,
        "command": shlex.join(["python", *sys.argv]),
        "batch": args.batch,
        "gpus_for_zero": args.gpus,
    }
    print(f"{header['date']}; commit {header['commit']}; {name}; torch {torch.__version__}")
    print(
        f"`{header['command']}`: per-GPU GB at batch {args.batch}; ZeRO columns for {args.gpus} GPUs; "
        f"estimate = measured saved activations x batch + weights/grads/AdamW from the parameter count (see the docstring)"
    )
    print()
    columns = " | ".join(f"est. {s}" for s in STRATEGIES)
    print(
        f"| model | params (M) | levers | act. MB/img (measured) | {columns} | est. max batch in {args.cap_gb:g} GB (ddp) |"
        + (" measured peak, 1 GPU |" if device.type == "cuda" else "")
    )
    print(
        "| --- | --- | --- | --- | "
        + " | ".join("---" for _ in STRATEGIES)
        + " | ---"
        + (" | --- |" if device.type == "cuda" else " |")
    )

    rows = []
    # Each row in a fresh process: a row's retained tensors and heap must not carry into the next one
    # (in one process the 512 px VQ-GAN rows exceed 24 GB together; alone, a row peaks at 3-12 GB).
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
    ) as pool:
        for label, config, overrides in cases:
            for levers in [LEVER_NAMES[name] for name in args.levers] if args.levers else LEVERS:
                row = pool.submit(measure_row, label, config, overrides, levers, vars(args)).result()
                if row is None:
                    continue  # BatchNorm models have no checkpointable blocks
                cells = " | ".join("n/a" if v is None else f"{v:.2f}" for v in row["estimate_gb"].values())
                line = f"| {label} | {row['params_m']:.1f} | {row['levers']} | {row['activation_mb_per_image']:.1f} | {cells} | {row['max_batch_in_cap']} |"
                if "measured_peak_gb" in row:
                    peak = row["measured_peak_gb"]
                    line += f" {peak if isinstance(peak, str) else f'{peak:.2f}'} |"
                if "max_batch_measured" in row:
                    line += f" largest fitting micro-batch: {row['max_batch_measured']} |"
                print(line, flush=True)
                rows.append(row)
                if args.json:  # after every row: a run stopped at a time limit keeps what it measured
                    write_json_atomically(Path(args.json), {"header": header, "rows": rows})
    if args.json:
        write_json_atomically(Path(args.json), {"header": header, "rows": rows})


if __name__ == "__main__":
    main()
