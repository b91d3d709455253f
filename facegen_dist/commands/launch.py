"""`facegen launch -- <command>`: inside an sbatch script, `accelerate launch` with SLURM's rendezvous (cluster/slurm.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facegen_dist.errors import FacegenError

HELP = "inside an sbatch script: srun facegen launch -- train ... (accelerate launch with SLURM's rendezvous)"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "launch",
        help=HELP,
        description="Inside a SLURM job step (one task per node): start `accelerate launch` with the job's rendezvous.",
        epilog="Example (in an sbatch script): srun facegen launch -- train --config configs/vqgan_ffhq512.yaml run.name=x",
    )
    parser.add_argument(
        "--procs-per-node",
        type=int,
        default=int(os.environ.get("FACEGEN_PROCS_PER_NODE") or 0),
        help="processes per node (default: the GPUs SLURM allocated on the node; 1 on CPU) [FACEGEN_PROCS_PER_NODE]",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        default=os.environ.get("FACEGEN_CPU", "0") == "1",
        help="train on CPU (gloo) [FACEGEN_CPU=1]",
    )
    parser.add_argument(
        "--accelerate-config",
        default=os.environ.get("FACEGEN_ACCELERATE_CONFIG", ""),
        help="an accelerate config file, e.g. DeepSpeed [FACEGEN_ACCELERATE_CONFIG]",
    )
    parser.add_argument(
        "--mixed-precision", default=os.environ.get("FACEGEN_MIXED_PRECISION", ""), choices=["", "no", "fp16", "bf16"]
    )
    parser.add_argument("--dry-run", action="store_true", help="check and print the command, start nothing")
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- then a facegen command: train|eval|codes|sample ..."
    )
    return parser


def run(args) -> int:
    """Errors name this node: with several nodes, the job's log interleaves their lines."""
    from facegen_dist.cluster.slurm import node_name

    try:
        return _launch(args)
    except FacegenError as error:
        if "SLURM_JOB_ID" not in os.environ:
            raise
        raise FacegenError(f"node {node_name()}: {error}") from None


def _launch(args) -> int:
    from facegen_dist.cluster.slurm import (
        accelerate_command,
        check_train_args,
        processes_per_node,
        rendezvous,
        start_node,
    )

    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        raise FacegenError(
            "facegen launch: nothing to launch; e.g. `facegen launch -- train --config configs/vae_avatars128.yaml`"
        )
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise FacegenError(f"--accelerate-config: no such file '{args.accelerate_config}'")
    if args.command[0] == "train":
        check_train_args(args.command[1:])
    rdzv = rendezvous()
    command = accelerate_command(args, rdzv, processes_per_node(args.procs_per_node, args.cpu))
    if args.dry_run:
        print(" ".join(command))
        return 0
    return start_node(command, rdzv, args.cpu)
