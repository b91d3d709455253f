"""`facegen submit`: one command from a config to a running SLURM job (submitit), or --local (cluster/submit.py)."""

from __future__ import annotations

from pathlib import Path

from facegen_dist.errors import FacegenError

HELP = "submit a training run to SLURM with submitit (or --local)"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "submit",
        help=HELP,
        description="Submit a training run to SLURM with submitit (one task per GPU); preempted, it checkpoints, requeues and resumes.",
        epilog="Example: facegen submit --config configs/vqgan_ffhq512.yaml --nodes 2 --gpus-per-node 4 --time 4:00:00 --partition gpu",
    )
    parser.add_argument("--config", action="append", default=[], required=True, help="YAML config (repeatable)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node = processes per node (default 1)"
    )
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo); with --tasks-per-node")
    parser.add_argument(
        "--tasks-per-node", type=int, default=0, help="processes per node (default: --gpus-per-node; with --cpu: 1)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0: the cluster's default)")
    parser.add_argument(
        "--time", default="4:00:00", help="time limit of each job run (it requeues itself at the limit)"
    )
    parser.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--account", default="")
    parser.add_argument("--local", action="store_true", help="run here, through submitit's local executor (no SLURM)")
    parser.add_argument(
        "--wait", action="store_true", help="wait for the job and print its summary (always with --local)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_images=1000000")
    return parser


def run(args) -> int:
    from facegen_dist.cluster.submit import check_partition, job_summary, parse_time_minutes, submit_training
    from facegen_dist.config import load_config

    cfg = load_config(args.config, args.overrides)  # a bad config stops here, before anything is submitted
    if args.cpu and args.gpus_per_node:
        raise FacegenError("--cpu and --gpus-per-node: choose one")
    gpus = 0 if args.cpu else (1 if args.gpus_per_node is None else args.gpus_per_node)
    tasks = args.tasks_per_node or gpus or 1
    if not args.cpu and gpus < 1:
        raise FacegenError("--gpus-per-node: must be >= 1 (or train on CPU with --cpu --tasks-per-node N)")
    timeout_min = parse_time_minutes(args.time)
    if not args.local:
        check_partition(args.partition)
    job, folder = submit_training(
        cfg,
        args.config,
        args.overrides,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        cpu=args.cpu,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        timeout_min=timeout_min,
        partition=args.partition,
        account=args.account,
        local=args.local,
    )
    print(
        f"facegen submit: job {job.job_id} ({args.nodes} node(s) x {tasks} task(s)); logs {folder}/{job.job_id}_*_log.*",
        flush=True,
    )
    if not (args.local or args.wait):
        print(f"facegen submit: watch it with `squeue -j {job.job_id}`; the run is {Path(cfg.run.dir) / cfg.run.name}")
        return 0
    summary = job_summary(job, folder)
    print(
        f"facegen submit: job {job.job_id} done: {summary.get('images_seen', '?')} images, world size {summary.get('world_size', '?')}",
        flush=True,
    )
    return 0
