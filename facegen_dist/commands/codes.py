"""`facegen codes`: encode a VQ run's images into code shards for its prior (also under `accelerate launch`)."""

from __future__ import annotations

import sys

from facegen_dist.errors import DataError

HELP = "encode a VQ run's images into code shards for its prior"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "codes",
        help=HELP,
        description="Encode a VQ run's image dataset into code shards for its prior (shards dealt over processes).",
    )
    parser.add_argument("--run", required=True, help="a trained vqvae / vqvae2 run folder")
    parser.add_argument("--out", required=True, help="output folder (must not hold a dataset)")
    parser.add_argument("--checkpoint", default="", help="checkpoint folder name of the run (default: its newest)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    parser.add_argument("--no-ema", action="store_true", help="encode with the raw weights instead of the EMA")
    return parser


def run(args) -> int:
    from facegen_dist.data.codes import encode_run
    from facegen_dist.data.shards import splits_summary

    if args.batch_size < 1:
        raise DataError("--batch-size must be >= 1")
    encoded = encode_run(args.run, args.out, args.checkpoint, args.batch_size, use_ema=not args.no_ema)
    if encoded is not None:  # the main process
        restored, manifest = encoded
        print(
            f"wrote {args.out}: {splits_summary(manifest)} ({restored.cfg.run.name} @ {restored.checkpoint.name}, grids {manifest['levels']})"
        )
        if manifest["skipped_unreadable"]:
            print(
                f"facegen: warning: {manifest['skipped_unreadable']} unreadable image(s) skipped; `facegen data verify` the image shards",
                file=sys.stderr,
            )
    return 0
