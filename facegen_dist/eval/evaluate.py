"""One evaluation: generate/reconstruct on every rank, gather features, compute, write the protocol record."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from facegen_dist import __version__
from facegen_dist.data.pipeline import count_split_images
from facegen_dist.data.shards import split_shards
from facegen_dist.errors import ConfigError, FacegenError
from facegen_dist.eval.extractors import Extractor
from facegen_dist.eval.features import distributed_features, to_uint8
from facegen_dist.eval.metrics import (
    METRICS,
    compute_feature_metric,
    laplacian_energy,
    psnr,
    sharpness,
    ssim,
    value_names,
)
from facegen_dist.eval.reference import reference_features, split_chunk_reader

FEATURE_METRICS = ("fid", "kid", "prc", "isc", "rfid")


def check_metrics(metrics: list[str]) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown {unknown}; known: {sorted(METRICS)}")
    if not metrics:
        raise ConfigError("eval.metrics: empty")
    return list(dict.fromkeys(metrics))


def chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk) % (2**63)


def evaluate(
    accelerator,
    method,
    modules: dict,
    data_dir: Path,
    eval_cfg,
    resolution: int,
    extractor: Extractor | None,
    metrics: list[str],
    num: int,
    context: dict,
    out_dir: Path | None,
) -> dict:
    """Compute `metrics` for the model in `modules` (eval mode); returns {"metrics": ..., "protocol": ...}.

    Every rank must call this. The record is written (main process) to out_dir/<images>-<extractor>-<N>.json.
    """
    metrics = check_metrics(metrics)
    started = time.perf_counter()
    batch = eval_cfg.batch_size
    needs_features = [m for m in metrics if m in FEATURE_METRICS]
    if needs_features and extractor is None:
        raise FacegenError(f"eval: {needs_features} need a feature extractor")
    available = count_split_images(split_shards(data_dir, eval_cfg.split))
    num_reference = min(num, available)
    batch = min(batch, max(1, math.ceil(num_reference / accelerator.num_processes)))
    values: dict[str, float] = {}
    protocol = {
        "metrics": metrics,
        "num_generated": num,
        "num_reference": num_reference,
        "batch_size": batch,
        "seed": eval_cfg.seed,
        "seeding": "chunk c of batch_size samples uses torch.Generator(seed*1000003 + c)",
        "model": {**context},
        "sampling": method.sampling_protocol(),
        "world_size": accelerator.num_processes,
        "resolution": resolution,
        "facegen_version": __version__,
    }
    reference, reference_stats = None, None
    if any(m in ("fid", "kid", "prc", "rfid") for m in metrics):
        reference, reference_stats, protocol["reference"] = reference_features(
            accelerator, data_dir, eval_cfg.split, resolution, extractor, num_reference, batch, Path(eval_cfg.cache_dir)
        )
    if extractor is not None:
        protocol["extractor"] = {
            "name": extractor.name,
            "weights_sha256": extractor.weights_sha256,
            "layers": extractor.layers,
        }

    shared = dict(
        accelerator=accelerator,
        method=method,
        modules=modules,
        eval_cfg=eval_cfg,
        batch=batch,
        extractor=extractor,
        reference_stats=reference_stats,
    )
    sample_metrics = [m for m in metrics if METRICS[m].needs == "samples"]
    if sample_metrics:
        values.update(_sample_metrics(sample_metrics, num, reference, **shared))
    recon_metrics = [m for m in metrics if METRICS[m].needs == "reconstructions"]
    if recon_metrics:
        reader = split_chunk_reader(data_dir, eval_cfg.split, num_reference, batch, resolution, accelerator)
        values.update(_reconstruction_metrics(recon_metrics, num_reference, reader, **shared))
    protocol["seconds"] = time.perf_counter() - started
    record = {"metrics": values, "protocol": protocol}
    if out_dir is not None and accelerator.is_main_process:
        write_record(record, out_dir)
    return record


def _sample_metrics(
    metrics, num, reference, *, accelerator, method, modules, eval_cfg, batch, extractor, reference_stats
) -> dict[str, float]:
    """FID/KID/PR/IS of `num` samples drawn over every rank, seeded per chunk (the same images for any world size)."""

    def make_samples(chunk, start, end):
        with torch.no_grad(), accelerator.autocast():
            images = method.sample(
                modules, end - start, torch.Generator().manual_seed(chunk_seed(eval_cfg.seed, chunk))
            )
        if images is None:
            raise FacegenError(
                f"eval: {type(method).__name__} cannot generate samples, so {metrics} cannot be computed"
            )
        return {"images": to_uint8(images)}

    generated = distributed_features(accelerator, num, batch, make_samples, extractor, "generating + features")
    values = {}
    for metric in metrics:
        layer = extractor.layers[metric]
        result = compute_feature_metric(
            metric,
            generated[f"feat/{layer}"],
            reference.get(layer) if reference else None,
            reference_stats,
            eval_cfg.seed,
        )
        values.update({value_names(metric, extractor.name)[k]: float(v) for k, v in result.items()})
    return values


def _reconstruction_metrics(
    metrics, num_reference, read_chunk, *, accelerator, method, modules, eval_cfg, batch, extractor, reference_stats
) -> dict[str, float]:
    """rFID, PSNR, SSIM and sharpness of the reconstructions of `num_reference` held-out images, over every rank."""

    def make_reconstructions(chunk, start, end):
        inputs = read_chunk(chunk, start, end).to(accelerator.device).float().div(255)
        with torch.no_grad(), accelerator.autocast():
            output = method.reconstruct(modules, inputs)
        if output is None:
            raise FacegenError(f"eval: {type(method).__name__} does not reconstruct, so {metrics} cannot be computed")
        output = output.float().clamp(0, 1)
        return {
            "images": to_uint8(output),
            "psnr": psnr(output, inputs),
            "ssim": ssim(output, inputs),
            "energy_reconstructed": laplacian_energy(output),
            "energy_input": laplacian_energy(inputs),
        }

    recon = distributed_features(
        accelerator,
        num_reference,
        batch,
        make_reconstructions,
        extractor if "rfid" in metrics else None,
        "reconstructing",
    )
    values = {}
    if "rfid" in metrics:
        result = compute_feature_metric(
            "rfid", recon[f"feat/{extractor.layers['rfid']}"], None, reference_stats, eval_cfg.seed
        )
        values.update({value_names("rfid", extractor.name)[k]: float(v) for k, v in result.items()})
    for metric in ("psnr", "ssim"):
        if metric in metrics:
            values[metric] = float(recon[metric].double().mean())
    if "sharpness" in metrics:
        values["sharpness"] = sharpness(recon["energy_reconstructed"], recon["energy_input"])
    return values


def write_record(record: dict, out_dir: Path) -> Path:
    """A metric value is only ever written together with its protocol."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol = record["protocol"]
    extractor = protocol.get("extractor", {}).get("name", "pixels")
    path = out_dir / f"{protocol['model'].get('images_seen', 0):012d}-{extractor}-{protocol['num_generated']}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    with open(out_dir / "history.jsonl", "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return path
