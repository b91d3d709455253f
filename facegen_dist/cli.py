"""`facegen` command line: train, data. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from facegen_dist.errors import FacegenError


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def _fail(message: str) -> int:
    if _is_main_rank():
        print(f"facegen: error: {message}", file=sys.stderr)
    return 2


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a model. Run it under `accelerate launch` for several GPUs/processes.",
        epilog="Example: accelerate launch train.py --config configs/vae_avatars64.yaml train.total_images=20000 run.name=x",
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later files win)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent_dim=200")
    args = parser.parse_args(argv)
    try:
        from facegen_dist.config import load_config
        from facegen_dist.train import run

        run(load_config(args.config, args.overrides))
    except FacegenError as error:
        return _fail(str(error))
    return 0


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="facegen data", description="Make and check WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    avatars = sub.add_parser("avatars", help="render the procedural avatar set (images + attribute JSON)")
    avatars.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    avatars.add_argument("--num", type=int, default=20000, help="number of images (train + val)")
    avatars.add_argument("--size", type=int, default=64, help="image side in pixels")
    avatars.add_argument("--seed", type=int, default=0)
    avatars.add_argument("--val-fraction", type=float, default=0.1)
    avatars.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    avatars.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    verify = sub.add_parser("verify", help="check shards against their manifest")
    verify.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "avatars":
            from facegen_dist.data.make_avatars import make_avatar_dataset

            manifest = make_avatar_dataset(args.out, args.num, args.size, args.seed, args.val_fraction, args.shard_size, args.workers)
            splits = ", ".join(f"{name} {info['num_samples']} in {len(info['shards'])} shards" for name, info in manifest["splits"].items())
            print(f"wrote {args.out}: {splits}")
        elif args.command == "verify":
            from facegen_dist.data.shards import verify_shards

            problems = verify_shards(args.dir)
            for problem in problems:
                print(f"facegen: {args.dir}/{problem}", file=sys.stderr)
            if problems:
                return _fail(f"{len(problems)} problem(s) in {args.dir}")
            print(f"{args.dir}: all shards match the manifest")
    except FacegenError as error:
        return _fail(str(error))
    return 0


def _delegate(module: str, function: str):
    """A subcommand living in `module` (imported on use, so `facegen data` does not load torch-fidelity)."""

    def run(argv: list[str]) -> int:
        try:
            return getattr(importlib.import_module(module), function)(argv)
        except FacegenError as error:
            return _fail(str(error))

    return run


eval_main = _delegate("facegen_dist.eval.cli", "eval_main")
extractor_main = _delegate("facegen_dist.eval.train_extractor", "extractor_main")
latent_main = _delegate("facegen_dist.analysis.cli", "latent_main")
sample_main = _delegate("facegen_dist.eval.sampling", "sample_main")
codes_main = _delegate("facegen_dist.data.codes", "codes_main")


COMMANDS = {"train": train_main, "data": data_main, "eval": eval_main, "extractor": extractor_main, "latent": latent_main, "sample": sample_main, "codes": codes_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: facegen {train,data,codes,eval,sample,extractor,latent} ...\n  train  train a model (same as train.py)\n  data   make or verify shards\n  codes  encode a VQ run's images into code shards for its prior\n  eval   FID/KID/PR/rFID/PSNR/SSIM of a run, with protocol\n  sample samples of a trained run as a PNG grid (shards over processes)\n  extractor train  train the avatar feature extractor\n  latent latent-space study of runs: reconstruction, latent map, prior samples, interpolation, attribute vectors", file=sys.stderr)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
