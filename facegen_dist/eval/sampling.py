"""`facegen sample --run runs/X --num 64 --out grid.png`: samples of a trained run as a PNG grid.

Works under `accelerate launch -m facegen_dist.cli sample ...` too: the N samples are cut into
fixed chunks of --batch-size (chunk c seeded with seed*1000003 + c), dealt to the processes and
gathered, so the grid is the same for any process count (the same scheme as `facegen eval`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from facegen_dist.accelerator import make_accelerator
from facegen_dist.errors import FacegenError
from facegen_dist.eval.evaluate import chunk_seed
from facegen_dist.eval.features import distributed_features, to_uint8
from facegen_dist.log.images import save_grid
from facegen_dist.runs import restore_run


def sample_run(run: str, overrides: list[str], use_ema: bool, num: int, batch_size: int, seed: int, out: str):
    """Draw `num` samples of run folder `run` into the PNG grid `out` and its .json record; every process calls it.

    Returns the record on the main process, None on the others.
    """
    accelerator = make_accelerator()
    try:
        restored = restore_run(run, overrides, device=accelerator.device, use_ema=use_ema)
        method, modules = restored.method, restored.modules
        if not method.can_sample():
            raise FacegenError(
                f"--run {run}: a '{restored.cfg.model.name}' run cannot sample (a VQ run needs a prior run trained on it: model.name=pixelcnn_prior or gpt_prior, model.vq_run={run})"
            )
        resolution = restored.cfg.data.resolution

        def make_chunk(chunk: int, start: int, end: int) -> dict[str, torch.Tensor]:
            # as `facegen eval` seeds its chunks
            generator = torch.Generator().manual_seed(chunk_seed(seed, chunk))
            with accelerator.autocast():
                images = method.sample(modules, end - start, generator)
            return {"pixels": to_uint8(images)}

        started = time.perf_counter()
        gathered = distributed_features(accelerator, num, batch_size, make_chunk, None, "sampling")
        seconds = time.perf_counter() - started
        if accelerator.is_main_process:
            images = gathered["pixels"].view(num, 3, resolution, resolution).div(255.0)
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            save_grid(images, out, nrow=max(1, int(math.sqrt(num))))
            record = {
                "run": restored.cfg.run.name,
                "checkpoint": restored.checkpoint.name,
                "images_seen": restored.images_seen,
                "ema": restored.ema,
                "num": num,
                "batch_size": batch_size,
                "seed": seed,
                "processes": accelerator.num_processes,
                "device": str(accelerator.device),
                "seconds": seconds,
                "seconds_per_image": seconds / num,
                "protocol": method.sampling_protocol(),
            }
            out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
            return record
        return None
    finally:
        accelerator.end_training()
