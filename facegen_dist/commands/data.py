"""`facegen data`: make shards (embedded avatars, FFHQ, Cartoon Set, any folder) and verify them."""

from __future__ import annotations

import argparse
import sys

from facegen_dist.errors import DataError

HELP = "make shards (avatars, ffhq, cartoonset, folder) or verify them"


def _add_conversion_arguments(parser: argparse.ArgumentParser, src_help: str, size_help: str) -> None:
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument(
        "--out", required=True, help="output folder (new, or an interrupted conversion of the same command to resume)"
    )
    parser.add_argument("--size", type=int, required=True, help=size_help)
    parser.add_argument(
        "--format",
        default="png",
        choices=["png", "jpg", "webp", "webp-lossless"],
        help="image format in the shards (default png; see benchmarks/RESULTS.md for size and decode speed of each)",
    )
    parser.add_argument(
        "--quality", type=int, default=None, help="jpg/webp quality (default: jpg 95 with 4:4:4 chroma, webp 90)"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="val share of the seeded split (default 0.2: the dissertation's 80/20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: about --shard-mb)")
    parser.add_argument(
        "--shard-mb", type=float, default=500.0, help="target shard size in MB when --shard-size is not given"
    )
    parser.add_argument("--workers", type=int, default=None, help="decode/resize processes (default: all cores)")
    parser.add_argument(
        "--allow-upscale", action="store_true", help="accept images smaller than --size (default: skip and report them)"
    )


def _options(args, split: str = "seeded", background: str = "white"):
    from facegen_dist.data.convert import ConvertOptions

    return ConvertOptions(
        size=args.size,
        image_format=args.format,
        quality=args.quality,
        split=split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_size=args.shard_size,
        shard_mb=args.shard_mb,
        allow_upscale=args.allow_upscale,
        background=background,
    )


def _report(out: str, manifest: dict) -> None:
    from facegen_dist.data.shards import splits_summary

    print(f"wrote {out}: {splits_summary(manifest)} ({manifest['image_size']} px {manifest['image_format']})")
    if manifest.get("num_skipped"):
        for record in manifest["skipped"][:10]:
            print(f"facegen: skipped {record['file']}: {record['reason']}", file=sys.stderr)
        more = f" (first 10 above; all in {out}/manifest.json)" if manifest["num_skipped"] > 10 else ""
        print(f"facegen: warning: {manifest['num_skipped']} source file(s) skipped{more}", file=sys.stderr)


def build_parser(subparsers):
    parser = subparsers.add_parser("data", help=HELP, description="Make and check WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    avatars = sub.add_parser("avatars", help="render the procedural avatar set (images + attribute JSON)")
    avatars.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    avatars.add_argument("--num", type=int, default=20000, help="number of images (train + val)")
    avatars.add_argument("--size", type=int, default=64, help="image side in pixels")
    avatars.add_argument("--seed", type=int, default=0, help="render seed: the same seed gives the same images")
    avatars.add_argument("--val-fraction", type=float, default=0.1, help="share of the images in the val split")
    avatars.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    avatars.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")

    ffhq = sub.add_parser("ffhq", help="FFHQ (images1024x1024/, thumbnails128x128/ or their zips) -> shards")
    _add_conversion_arguments(
        ffhq,
        "FFHQ folder (holding images1024x1024/ or thumbnails128x128/, and ffhq-dataset-v2.json if you have it), one of those folders, or its .zip",
        "image side: 128, 256, 512 or 1024 (thumbnails are used for <= 128)",
    )
    ffhq.add_argument(
        "--split",
        default="seeded",
        choices=["seeded", "official"],
        help="seeded --val-fraction split (default), or FFHQ's own 60k/10k (needs ffhq-dataset-v2.json)",
    )
    cartoon = sub.add_parser(
        "cartoonset", help="Google Cartoon Set 10k/100k (PNG + CSV of attributes) -> shards with attribute JSON"
    )
    _add_conversion_arguments(
        cartoon, "cartoonset10k/ or cartoonset100k/ folder, or its .tgz", "image side in px (the originals are 500)"
    )
    cartoon.add_argument(
        "--background", default="white", help="colour behind the transparent background (default white)"
    )
    folder = sub.add_parser("folder", help="any folder of images (png/jpg/webp/bmp/tif, any depth) -> shards")
    _add_conversion_arguments(
        folder,
        "folder of images (or a .zip/.tar/.tgz of one)",
        "image side in px (non-square images are centre-cropped)",
    )

    verify = sub.add_parser("verify", help="check shards against their manifest")
    verify.add_argument("dir")
    return parser


def run(args) -> int:

    if args.command == "avatars":
        from facegen_dist.data.make_avatars import make_avatar_dataset

        _report(
            args.out,
            make_avatar_dataset(
                args.out, args.num, args.size, args.seed, args.val_fraction, args.shard_size, args.workers
            ),
        )
    elif args.command in ("ffhq", "cartoonset", "folder"):
        from facegen_dist.data import sources
        from facegen_dist.data.convert import convert

        if args.command == "ffhq":
            source, options = sources.ffhq_source(args.src, args.size), _options(args, split=args.split)
        elif args.command == "cartoonset":
            source, options = sources.cartoonset_source(args.src), _options(args, background=args.background)
        else:
            source, options = sources.folder_source(args.src), _options(args)
        try:
            _report(args.out, convert(source, args.out, options, workers=args.workers))
        except KeyboardInterrupt:
            raise DataError("interrupted; finished shards are kept: run the same command again to resume") from None
    else:
        from facegen_dist.data.shards import verify_shards

        problems = verify_shards(args.dir)
        for problem in problems:
            print(f"facegen: {args.dir}/{problem}", file=sys.stderr)
        if problems:
            raise DataError(f"{len(problems)} problem(s) in {args.dir}")
        print(f"{args.dir}: all shards match the manifest")
    return 0
