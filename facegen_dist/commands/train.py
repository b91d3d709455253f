"""`facegen train` = `accelerate launch train.py`: train a model from YAML configs and dotted overrides."""

from __future__ import annotations

import sys

from facegen_dist.commands import is_main_rank

HELP = "train a model (same as train.py)"
# `k=v --config X k2=v2` as well as `--config X k=v k2=v2`: the CLI parses this command with parse_intermixed_args.
INTERMIXED = True


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "train",
        help=HELP,
        description="Train a model. Run it under `accelerate launch` for several GPUs/processes.",
        epilog="Example: accelerate launch train.py --config configs/vae_avatars64.yaml train.total_images=20000 run.name=x",
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later files win)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (defaults, files, overrides) and exit"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent_dim=200")
    return parser


def run(args) -> int:
    from facegen_dist.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides, check_data=not args.print_config)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from facegen_dist.train.loop import run as train

    result = train(cfg)
    if result.get("preempted") and is_main_rank():
        from facegen_dist.cluster.slurm import after_preemption

        print(f"facegen: {after_preemption()}", file=sys.stderr, flush=True)
    return 0
