"""`facegen sample`: samples of a trained run as one PNG grid (also under `accelerate launch`: sharded over processes)."""

from __future__ import annotations

from pathlib import Path

from facegen_dist.errors import FacegenError

HELP = "samples of a trained run as a PNG grid (shards over processes)"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "sample", help=HELP, description="Draw samples from a trained run and save them as one PNG grid."
    )
    parser.add_argument("--run", required=True, help="run folder, e.g. runs/prior_vqvae2_avatars64")
    parser.add_argument("--num", type=int, default=64, help="number of samples")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="samples drawn together (fixed: results do not depend on the process count)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperature", type=float, default=None, help="prior runs: sampling temperature (default: the run's)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="prior runs: keep the k most likely codes (0 = all)")
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="gpt_prior runs: keep the smallest set of codes holding this probability",
    )
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    parser.add_argument("overrides", nargs="*", help="config overrides of the run")
    return parser


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    if args.temperature is not None or args.top_k is not None or args.top_p is not None:
        from omegaconf import OmegaConf

        config = Path(args.run) / "config.yaml"
        name = OmegaConf.load(config).model.name if config.is_file() else None
        if name is not None and name not in ("pixelcnn_prior", "gpt_prior"):
            raise FacegenError(
                f"--temperature/--top-k/--top-p: only prior runs (pixelcnn_prior, gpt_prior) sample with them; {args.run} is a '{name}' run"
            )
    if args.temperature is not None:
        extra.append(f"model.temperature={args.temperature}")
    if args.top_k is not None:
        extra.append(f"model.top_k={args.top_k}")
    if args.top_p is not None:
        if name == "pixelcnn_prior":
            raise FacegenError(f"--top-p: gpt_prior runs sample with it; {args.run} is a pixelcnn_prior run")
        extra.append(f"model.top_p={args.top_p}")
    return extra


def run(args) -> int:
    from facegen_dist.eval.sampling import sample_run

    if args.num < 1 or args.batch_size < 1:
        raise FacegenError("--num and --batch-size must be >= 1")
    if not args.out.endswith(".png"):
        raise FacegenError(f"--out {args.out}: must be a .png file")
    record = sample_run(args.run, _overrides(args), not args.no_ema, args.num, args.batch_size, args.seed, args.out)
    if record is not None:  # the main process
        seconds, processes = record["seconds"], record["processes"]
        print(
            f"wrote {Path(args.out)}: {args.num} samples in {seconds:.1f} s ({seconds / args.num:.3f} s/image, "
            f"{processes} process{'es' if processes > 1 else ''} on {record['device']})"
        )
    return 0
