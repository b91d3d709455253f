"""`facegen export`: a run's EMA weights, resolved config and model card in one folder to share or load."""

from __future__ import annotations

HELP = "export a run's weights + config + model card (loadable by facegen_dist.load, sample, eval)"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "export",
        help=HELP,
        description="Write a run's newest checkpoint as an export folder: model.safetensors (EMA weights), "
        "config.yaml, export.json and README.md (a model card); a prior's VQ model goes into upstream/.",
        epilog="Example: facegen export --run runs/vqgan_avatars64 --out exports/vqgan_avatars64",
    )
    parser.add_argument("--run", required=True, help="run folder")
    parser.add_argument("--out", required=True, help="export folder to write (must not exist or be empty)")
    parser.add_argument("--checkpoint", default="", help="a checkpoint folder name of the run (default: its newest)")
    return parser


def run(args) -> int:
    from facegen_dist.runs import export_run

    out = export_run(args.run, args.out, checkpoint_name=args.checkpoint)
    print(
        f"facegen: exported {args.run} to {out}; load it with facegen_dist.load('{out}') or facegen sample --run {out}"
    )
    return 0
