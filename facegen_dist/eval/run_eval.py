"""Evaluating a run folder, what `facegen eval --run runs/X --metrics fid,kid,prc --num 10000` runs (commands/eval.py)."""

from __future__ import annotations

from facegen_dist.accelerator import make_accelerator
from facegen_dist.data.codes import image_dir
from facegen_dist.data.resolve import resolve_data_dir
from facegen_dist.data.shards import read_manifest
from facegen_dist.eval.evaluate import FEATURE_METRICS, check_metrics, evaluate
from facegen_dist.eval.extractors import build_extractor
from facegen_dist.runs import EVAL_DIR, restore_run


def evaluate_run(
    run: str,
    metrics: list[str] | None,
    num: int | None,
    use_ema: bool,
    extractor_name: str | None,
    overrides: list[str],
):
    """Evaluate run folder `run` and write the record to its eval/; every process calls it.

    None means the run's eval.metrics / eval.num_samples / eval.extractor. Returns (the restored run,
    the record) on the main process, None on the others.
    """
    accelerator = make_accelerator()
    try:
        overrides = list(overrides) + ([f"eval.extractor={extractor_name}"] if extractor_name else [])
        restored = restore_run(run, overrides, device=accelerator.device, use_ema=use_ema)
        cfg = restored.cfg
        metrics = check_metrics(metrics or list(cfg.eval.metrics))
        num = num or cfg.eval.num_samples
        data_dir = image_dir(resolve_data_dir(cfg.data, accelerator))  # a prior trained on code shards: their images
        needs = [m for m in metrics if m in FEATURE_METRICS]
        extractor = (
            build_extractor(cfg.eval, needs, accelerator.device, read_manifest(data_dir).get("name")) if needs else None
        )
        context = {
            "run": cfg.run.name,
            "checkpoint": restored.checkpoint.name,
            "images_seen": restored.images_seen,
            "ema": restored.ema,
        }
        record = evaluate(
            accelerator,
            restored.method,
            restored.modules,
            data_dir,
            cfg.eval,
            cfg.data.resolution,
            extractor,
            metrics,
            num,
            context,
            restored.run_dir / EVAL_DIR,
        )
        return (restored, record) if accelerator.is_main_process else None
    finally:
        accelerator.end_training()
