"""`facegen eval`: FID/KID/PR/rFID/PSNR/SSIM of a run (also under `accelerate launch -m facegen_dist.cli eval ...`)."""

from __future__ import annotations

HELP = "FID/KID/PR/rFID/PSNR/SSIM of a run, with protocol"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "eval",
        help=HELP,
        description="FID/KID/precision-recall/rFID/PSNR/SSIM of a trained run, with its protocol.",
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
    return parser


def run(args) -> int:
    from facegen_dist.eval.run_eval import evaluate_run

    metrics = args.metrics.split(",") if args.metrics else None
    evaluated = evaluate_run(args.run, metrics, args.num, not args.no_ema, args.extractor, args.overrides)
    if evaluated is not None:  # the main process
        restored, record = evaluated
        cfg, protocol = restored.cfg, record["protocol"]
        print(
            f"{cfg.run.name} @ {restored.images_seen} images ({'EMA' if restored.ema else 'raw'}), {protocol['num_generated']} samples vs {protocol['num_reference']} {cfg.eval.split} images, extractor {protocol.get('extractor', {}).get('name', '-')}:"
        )
        for name, value in record["metrics"].items():
            print(f"  {name:>18} {value:.6g}")
        print(f"written to {restored.run_dir / 'eval'}")
    return 0
