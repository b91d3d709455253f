"""`facegen sample --run runs/X --num 64 --out grid.png`: samples of a trained run as a PNG grid.

Works under `accelerate launch -m facegen_dist.cli sample ...` too: the N samples are cut into
fixed chunks of --batch-size (chunk c seeded with seed*1000003 + c), dealt to the processes and
gathered, so the grid is the same for any process count (the same scheme as `facegen eval`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from facegen_dist.accelerator import make_accelerator
from facegen_dist.errors import FacegenError
from facegen_dist.eval.evaluate import chunk_seed
from facegen_dist.eval.features import distributed_features, to_uint8
from facegen_dist.log.images import save_grid
from facegen_dist.runs import CONFIG_FILE, restore_run


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    if args.temperature is not None or args.top_k is not None or args.top_p is not None:
        config = Path(args.run) / CONFIG_FILE
        name = OmegaConf.load(config).model.name if config.is_file() else None
        if name is not None and name not in ("pixelcnn_prior", "gpt_prior"):
            raise FacegenError(
                f"--temperature/--top-k/--top-p: only prior runs (pixelcnn_prior, gpt_prior) sample with them; {args.run} is a '{name}' run"
            )
    if args.temperature is not None:
        extra.append(f"model.temperature={args.temperature}")
    if args.top_k is not None:
        extra.append(f"model.top_k={args.top_k}")
    if args.top_p is not None:
        if name == "pixelcnn_prior":
            raise FacegenError(f"--top-p: gpt_prior runs sample with it; {args.run} is a pixelcnn_prior run")
        extra.append(f"model.top_p={args.top_p}")
    return extra


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="facegen sample", description="Draw samples from a trained run and save them as one PNG grid."
    )
    parser.add_argument("--run", required=True, help="run folder, e.g. runs/prior_vqvae2_avatars64")
    parser.add_argument("--num", type=int, default=64, help="number of samples")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="samples drawn together (fixed: results do not depend on the process count)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperature", type=float, default=None, help="prior runs: sampling temperature (default: the run's)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="prior runs: keep the k most likely codes (0 = all)")
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="gpt_prior runs: keep the smallest set of codes holding this probability",
    )
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    parser.add_argument("overrides", nargs="*", help="config overrides of the run")
    args = parser.parse_args(argv)
    if args.num < 1 or args.batch_size < 1:
        raise FacegenError("--num and --batch-size must be >= 1")
    if not args.out.endswith(".png"):
        raise FacegenError(f"--out {args.out}: must be a .png file")
    accelerator = make_accelerator()
    try:
        restored = restore_run(args.run, _overrides(args), device=accelerator.device, use_ema=not args.no_ema)
        method, modules = restored.method, restored.modules
        if not method.can_sample():
            raise FacegenError(
                f"--run {args.run}: a '{restored.cfg.model.name}' run cannot sample (a VQ run needs a prior run trained on it: model.name=pixelcnn_prior or gpt_prior, model.vq_run={args.run})"
            )
        resolution = restored.cfg.data.resolution

        def make_chunk(chunk: int, start: int, end: int) -> dict[str, torch.Tensor]:
            # as `facegen eval` seeds its chunks
            generator = torch.Generator().manual_seed(chunk_seed(args.seed, chunk))
            with accelerator.autocast():
                images = method.sample(modules, end - start, generator)
            return {"pixels": to_uint8(images)}

        started = time.perf_counter()
        gathered = distributed_features(accelerator, args.num, args.batch_size, make_chunk, None, "sampling")
        seconds = time.perf_counter() - started
        if accelerator.is_main_process:
            images = gathered["pixels"].view(args.num, 3, resolution, resolution).div(255.0)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            save_grid(images, out, nrow=max(1, int(math.sqrt(args.num))))
            record = {
                "run": restored.cfg.run.name,
                "checkpoint": restored.checkpoint.name,
                "images_seen": restored.images_seen,
                "ema": restored.ema,
                "num": args.num,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "processes": accelerator.num_processes,
                "device": str(accelerator.device),
                "seconds": seconds,
                "seconds_per_image": seconds / args.num,
                "protocol": method.sampling_protocol(),
            }
            out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
            print(
                f"wrote {out}: {args.num} samples in {seconds:.1f} s ({seconds / args.num:.3f} s/image, "
                f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''} on {accelerator.device})"
            )
    finally:
        accelerator.end_training()
    return 0
