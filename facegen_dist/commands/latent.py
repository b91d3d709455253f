"""`facegen latent`: latent-space study of runs (also under `accelerate launch -m facegen_dist.cli latent ...`)."""

from __future__ import annotations

from pathlib import Path

from facegen_dist.errors import ConfigError

HELP = "latent-space study of runs: reconstruction, latent map, prior samples, interpolation, attribute vectors"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "latent",
        help=HELP,
        description="Latent-space study of trained runs: reconstruction, latent map, prior samples, interpolation, attribute vectors.",
        epilog="Example: facegen latent --run runs/vae_avatars64 --run runs/ae_avatars64 --out study --attr hair_color",
    )
    parser.add_argument(
        "--run",
        "--runs",
        dest="run",
        nargs="+",
        action="extend",
        required=True,
        help="run folder(s) to compare side by side: --run A --run B or --runs A B (as facegen report)",
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
    return parser


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


def run(args) -> int:
    from facegen_dist.analysis.latent import StudyOptions
    from facegen_dist.analysis.study import study_runs

    if args.num < 10:
        raise ConfigError(f"--num {args.num}: needs at least 10 images")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be >= 1")
    options = StudyOptions(attr=args.attr, attr_value=args.attr_value, seed=args.seed, prior_samples=args.samples)
    studied = study_runs(args.run, args.out, options, args.num, args.batch_size, not args.no_ema, args.overrides)
    if studied is not None:  # the main process
        records, figures = studied
        for record in records:
            print(_summary(record))
        notes = {record["latent_map"]["tsne"].get("skipped") for record in records} - {None}
        for note in notes:
            print(note)
        print(f"wrote {', '.join(path.name for path in figures)} and latent.json to {Path(args.out)}")
    return 0
