"""Features of N images made on every rank and gathered, the same whatever the process count.

The N images are cut into fixed chunks of `batch_size` (chunk c = images c*B ... c*B+B-1), dealt to ranks
round-robin. A chunk is generated (its noise seeded by (seed, c)) and featurised as one batch on whichever rank
gets it, so every image and feature comes from the same inputs in the same batch for P = 1, 2, 8 ... processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from facegen_dist.errors import FacegenError
from facegen_dist.eval.extractors import Extractor
from facegen_dist.log.progress import progress_bar


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)


def chunk_bounds(num: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch_size, num)) for start in range(0, num, batch_size)]


def my_chunks(num: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, math.ceil(num / batch_size), world_size))


def gather_rows(accelerator, rows: torch.Tensor, indices: torch.Tensor, num: int) -> torch.Tensor:
    """Rows computed on each rank (with their global indices) -> all `num` rows in index order, on every rank."""
    if accelerator.num_processes == 1:
        ordered = torch.empty((num, *rows.shape[1:]), dtype=rows.dtype)
        ordered[indices] = rows
        return ordered
    # Ranks may hold different counts: pad to the largest, mark padding with index -1.
    counts = accelerator.gather(torch.tensor([rows.shape[0]], device=accelerator.device)).cpu()
    most = int(counts.max())
    padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype)
    padded[: rows.shape[0]] = rows
    padded_indices = torch.full((most,), -1, dtype=torch.long)
    padded_indices[: indices.shape[0]] = indices
    all_rows = accelerator.gather(padded.to(accelerator.device)).cpu()
    all_indices = accelerator.gather(padded_indices.to(accelerator.device)).cpu()
    keep = all_indices >= 0
    ordered = torch.empty((num, *rows.shape[1:]), dtype=rows.dtype)
    ordered[all_indices[keep]] = all_rows[keep]
    return ordered


def distributed_features(
    accelerator,
    num: int,
    batch_size: int,
    make_chunk: Callable[[int, int, int], dict[str, torch.Tensor]],
    extractor: Extractor | None,
    description: str,
) -> dict[str, torch.Tensor]:
    """Run `make_chunk(chunk, start, end)` over this rank's chunks, featurise, gather.

    `make_chunk` returns a dict with uint8 `images` [n,3,H,W] (featurised under `feat/<layer>`)
    and optionally per-image float rows (e.g. `psnr`), gathered as they are.
    """
    if math.ceil(num / batch_size) < accelerator.num_processes:  # same verdict on every rank: no hang
        raise FacegenError(
            f"{description}: {num} samples in batches of {batch_size} give fewer batches than the {accelerator.num_processes} processes; use a smaller batch size (eval.batch_size, or --batch-size)"
        )
    chunks = my_chunks(num, batch_size, accelerator.process_index, accelerator.num_processes)
    bounds = chunk_bounds(num, batch_size)
    collected: dict[str, list[torch.Tensor]] = {}
    indices = []
    bar = progress_bar(chunks, desc=description, unit="batch", disable=not accelerator.is_main_process, leave=False)
    for chunk in bar:
        start, end = bounds[chunk]
        produced = make_chunk(chunk, start, end)
        rows = {key: value.detach().float().cpu() for key, value in produced.items() if key != "images"}
        if extractor is not None and "images" in produced:
            rows.update(
                {f"feat/{name}": value for name, value in extractor(produced["images"].to(accelerator.device)).items()}
            )
        for key, value in rows.items():
            collected.setdefault(key, []).append(value.reshape(end - start, -1))
        indices.append(torch.arange(start, end))
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    gathered = {}
    for key in sorted(collected):
        gathered[key] = gather_rows(accelerator, torch.cat(collected[key]), local_indices, num)
    return gathered
