"""`facegen latent --run runs/X [--run runs/Y ...] --out DIR` (also under `accelerate launch -m facegen_dist.cli latent ...`).

Every rank restores the runs, checks the input and encodes its share of the val images; the
latents are gathered and the main process computes the numbers, draws the figures and writes
latent.json. Every check that can fail runs on every rank before the first collective, so a
bad input stops all ranks with the same one-line error instead of leaving some waiting.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from facegen_dist import __version__
from facegen_dist.accelerator import make_accelerator
from facegen_dist.analysis.latent import (
    StudyOptions,
    choose_attribute_value,
    encode_split,
    read_split_attributes,
    study_run,
)
from facegen_dist.data.codes import image_dir
from facegen_dist.data.pipeline import count_split_images, read_images
from facegen_dist.data.resolve import resolve_data_dir
from facegen_dist.data.shards import MANIFEST_NAME, read_manifest, split_shards, write_json_atomic
from facegen_dist.errors import ConfigError, FacegenError
from facegen_dist.eval.reference import file_digest
from facegen_dist.runs import RestoredRun, restore_run

SPLIT = "val"
FIGURE_IMAGES = 64  # val images read in full for the picture views (the first ones of the split)


@dataclass
class Subject:
    restored: RestoredRun
    model: object
    data_dir: Path
    num: int
    values: list[str]  # the attribute of each of the `num` val images

    @property
    def title(self) -> str:
        cfg = self.restored.cfg
        weights = "EMA" if self.restored.ema else "raw weights"
        return f"{cfg.run.name} ({cfg.model.name.upper()}) · {self.restored.images_seen:,} images · {weights}"


def _prepare(accelerator, run_dir: str, args) -> Subject:
    restored = restore_run(run_dir, args.overrides, device=accelerator.device, use_ema=not args.no_ema)
    model = restored.method.latent_model(restored.modules)
    if model is None:
        raise FacegenError(
            f"--run {run_dir}: model '{restored.cfg.model.name}' has no continuous latent, so there is no latent space to study"
        )
    data_dir = image_dir(resolve_data_dir(restored.cfg.data, accelerator))
    vocabulary = read_manifest(data_dir).get("attributes", {})
    if args.attr not in vocabulary:
        raise ConfigError(
            f"--attr {args.attr}: the data of {run_dir} ({data_dir}) has no such attribute; it has {', '.join(sorted(vocabulary)) or 'none'}"
        )
    shards = split_shards(data_dir, SPLIT)
    num = min(args.num, count_split_images(shards))
    if math.ceil(num / args.batch_size) < accelerator.num_processes:
        raise ConfigError(
            f"--batch-size {args.batch_size}: {num} images give fewer batches than the {accelerator.num_processes} processes; lower it"
        )
    values = [str(attributes.get(args.attr, "(missing)")) for attributes in read_split_attributes(shards, num)]
    choose_attribute_value(values, args.attr, args.attr_value)  # fails here, on every rank, rather than after encoding
    return Subject(restored, model, data_dir, num, values)


def _run_record(subject: Subject, numbers: dict) -> dict:
    restored = subject.restored
    return {
        "run": restored.cfg.run.name,
        "run_dir": str(restored.run_dir),
        "model": restored.cfg.model.name,
        "checkpoint": restored.checkpoint.name,
        "images_seen": restored.images_seen,
        "ema": restored.ema,
        "data_dir": str(subject.data_dir),
        "dataset_manifest_sha256": file_digest(subject.data_dir / MANIFEST_NAME),
        **numbers,
    }


def _number(value: float | None) -> str:
    return "n/a (singular fit)" if value is None else f"{value:.4g}"


def _summary(record: dict) -> str:
    latent_map, generation = record["latent_map"], record["generation"]
    if latent_map["kl_gaussian_fit"] is None:
        kl = f"KL(diagonal fit||N(0,I)) {_number(latent_map['kl_diagonal_gaussian_fit'])}"
    else:
        kl = f"KL(fit||N(0,I)) {_number(latent_map['kl_gaussian_fit'])}"
    if "skipped" in generation:
        prior = "prior samples: none (no N(0, I) prior)"
    else:
        prior = f"Mahalanobis median: prior z {_number(generation['mahalanobis_prior_median'])}, codes {_number(generation['mahalanobis_code_median'])}"
    return (
        f"{record['run']} ({record['model']}, {record['images_seen']:,} images{', EMA' if record['ema'] else ''}): "
        f"PSNR {record['reconstruction']['psnr_mean']:.2f} dB | {kl} | "
        f"{latent_map['knn']['k']}-NN {latent_map['attr']} {latent_map['knn']['accuracy']:.3f} (majority {latent_map['knn']['majority_baseline']:.3f}) | {prior}"
    )


def latent_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="facegen latent",
        description="Latent-space study of trained runs: reconstruction, latent map, prior samples, interpolation, attribute vectors.",
        epilog="Example: facegen latent --run runs/vae_avatars64 --run runs/ae_avatars64 --out study --attr hair_color",
    )
    parser.add_argument(
        "--run", action="append", required=True, help="run folder (repeat to compare runs side by side)"
    )
    parser.add_argument("--out", required=True, help="folder for the PNGs and latent.json")
    parser.add_argument(
        "--num",
        type=int,
        default=2000,
        help="val images encoded for the latent map and its numbers (capped at the split size)",
    )
    parser.add_argument(
        "--attr", default="hair_color", help="avatar attribute that colours the map and makes the attribute vector"
    )
    parser.add_argument(
        "--attr-value",
        default=None,
        help="value for the attribute vector (default: the most common one other than 'none')",
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="prior samples in the generation grid (a square number fills it)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prior samples, k-NN split and t-SNE")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="images encoded together (fixed so results do not depend on the process count)",
    )
    parser.add_argument("--no-ema", action="store_true", help="study the raw weights instead of the EMA")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.cache_dir=/data")
    args = parser.parse_args(argv)
    if args.num < 10:
        raise ConfigError(f"--num {args.num}: needs at least 10 images")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be >= 1")
    options = StudyOptions(attr=args.attr, attr_value=args.attr_value, seed=args.seed, prior_samples=args.samples)
    accelerator = make_accelerator()
    try:
        subjects = [_prepare(accelerator, run_dir, args) for run_dir in args.run]
        studies, records = [], []
        for subject in subjects:
            resolution = subject.restored.cfg.data.resolution
            encoded = encode_split(
                accelerator,
                subject.model,
                subject.data_dir,
                SPLIT,
                subject.num,
                args.batch_size,
                resolution,
                f"encoding {subject.restored.cfg.run.name}",
            )
            if accelerator.is_main_process:
                images, _ = read_images(
                    split_shards(subject.data_dir, SPLIT), min(subject.num, FIGURE_IMAGES), resolution
                )
                numbers, pictures = study_run(subject.model, encoded, images, subject.values, options)
                studies.append({"title": subject.title, "numbers": numbers, "pictures": pictures})
                records.append(_run_record(subject, numbers))
        if accelerator.is_main_process:
            from facegen_dist.analysis.figures import save_figures

            out_dir = Path(args.out)
            figures = save_figures(studies, out_dir)
            protocol = {
                "split": SPLIT,
                "num_requested": args.num,
                "batch_size": args.batch_size,
                "facegen_version": __version__,
                **asdict(options),
            }
            write_json_atomic(
                out_dir / "latent.json", {"protocol": protocol, "runs": records}, indent=1, sort_keys=False
            )
            for record in records:
                print(_summary(record))
            notes = {record["latent_map"]["tsne"].get("skipped") for record in records} - {None}
            for note in notes:
                print(note)
            print(f"wrote {', '.join(path.name for path in figures)} and latent.json to {out_dir}")
    finally:
        accelerator.end_training()
    return 0
