"""The latent study of run folders, what `facegen latent --run runs/X [--run runs/Y ...] --out DIR` runs.

Every rank restores the runs, checks the input and encodes its share of the val images; the latents are gathered
and the main process computes the numbers, draws the figures and writes latent.json.
"""

from __future__ import annotations

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


def _prepare(
    accelerator, run_dir: str, options: StudyOptions, num: int, batch_size: int, use_ema: bool, overrides: list[str]
) -> Subject:
    restored = restore_run(run_dir, overrides, device=accelerator.device, use_ema=use_ema)
    model = restored.method.latent_model(restored.modules)
    if model is None:
        raise FacegenError(
            f"--run {run_dir}: model '{restored.cfg.model.name}' has no continuous latent, so there is no latent space to study"
        )
    data_dir = image_dir(resolve_data_dir(restored.cfg.data, accelerator))
    vocabulary = read_manifest(data_dir).get("attributes", {})
    if options.attr not in vocabulary:
        raise ConfigError(
            f"--attr {options.attr}: the data of {run_dir} ({data_dir}) has no such attribute; it has {', '.join(sorted(vocabulary)) or 'none'}"
        )
    shards = split_shards(data_dir, SPLIT)
    num = min(num, count_split_images(shards))
    if math.ceil(num / batch_size) < accelerator.num_processes:
        raise ConfigError(
            f"--batch-size {batch_size}: {num} images give fewer batches than the {accelerator.num_processes} processes; lower it"
        )
    values = [str(attributes.get(options.attr, "(missing)")) for attributes in read_split_attributes(shards, num)]
    # fails here, on every rank, rather than after encoding
    choose_attribute_value(values, options.attr, options.attr_value)
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


def study_runs(
    run_dirs: list[str],
    out: str,
    options: StudyOptions,
    num: int,
    batch_size: int,
    use_ema: bool,
    overrides: list[str],
) -> tuple[list[dict], list[Path]] | None:
    """Study each run's latent space on `num` val images and write the figures and latent.json to `out`.

    Every process calls it. Returns (one record per run, the figures) on the main process, None on the others.
    """
    accelerator = make_accelerator()
    try:
        # Every check that can fail runs on every rank before the first collective, so a bad input stops all
        # ranks with the same one-line error instead of leaving some waiting.
        subjects = [
            _prepare(accelerator, run_dir, options, num, batch_size, use_ema, overrides) for run_dir in run_dirs
        ]
        studies, records = [], []
        for subject in subjects:
            resolution = subject.restored.cfg.data.resolution
            encoded = encode_split(
                accelerator,
                subject.model,
                subject.data_dir,
                SPLIT,
                subject.num,
                batch_size,
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

            out_dir = Path(out)
            figures = save_figures(studies, out_dir)
            protocol = {
                "split": SPLIT,
                "num_requested": num,
                "batch_size": batch_size,
                "facegen_version": __version__,
                **asdict(options),
            }
            write_json_atomic(
                out_dir / "latent.json", {"protocol": protocol, "runs": records}, indent=1, sort_keys=False
            )
            return records, figures
        return None
    finally:
        accelerator.end_training()
