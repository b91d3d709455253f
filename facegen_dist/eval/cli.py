"""`facegen eval --run runs/X --metrics fid,kid,prc --num 10000` (also under `accelerate launch -m facegen_dist.cli eval ...`)."""

from __future__ import annotations

import argparse

from facegen_dist.accelerator import make_accelerator
from facegen_dist.data.codes import image_dir
from facegen_dist.data.resolve import resolve_data_dir
from facegen_dist.data.shards import read_manifest
from facegen_dist.eval.evaluate import FEATURE_METRICS, check_metrics, evaluate
from facegen_dist.eval.extractors import build_extractor
from facegen_dist.runs import EVAL_DIR, restore_run


def eval_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="facegen eval", description="FID/KID/precision-recall/rFID/PSNR/SSIM of a trained run, with its protocol."
    )
    parser.add_argument("--run", required=True, help="run folder, e.g. runs/vae_avatars64")
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma list from fid,kid,prc,isc,rfid,psnr,ssim,sharpness (default: eval.metrics of the run)",
    )
    parser.add_argument("--num", type=int, default=None, help="generated samples (default: eval.num_samples)")
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    parser.add_argument(
        "--extractor",
        default=None,
        help="inception-v3-compat | avatar | auto | a registered name (default: eval.extractor)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.inception_weights=/path/weights.pth")
    args = parser.parse_args(argv)
    accelerator = make_accelerator()
    try:
        overrides = list(args.overrides) + ([f"eval.extractor={args.extractor}"] if args.extractor else [])
        restored = restore_run(args.run, overrides, device=accelerator.device, use_ema=not args.no_ema)
        cfg = restored.cfg
        metrics = check_metrics(args.metrics.split(",") if args.metrics else list(cfg.eval.metrics))
        num = args.num or cfg.eval.num_samples
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
        if accelerator.is_main_process:
            protocol = record["protocol"]
            print(
                f"{cfg.run.name} @ {restored.images_seen} images ({'EMA' if restored.ema else 'raw'}), {protocol['num_generated']} samples vs {protocol['num_reference']} {cfg.eval.split} images, extractor {protocol.get('extractor', {}).get('name', '-')}:"
            )
            for name, value in record["metrics"].items():
                print(f"  {name:>18} {value:.6g}")
            print(f"written to {restored.run_dir / EVAL_DIR}")
    finally:
        accelerator.end_training()
    return 0
