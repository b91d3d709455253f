"""SLURM: the job's environment -> `accelerate launch`, checks before anything starts, and requeue.

Each script in slurm/ runs `srun facegen launch -- train --config ...` with one task per node (the layout of
accelerate's examples/slurm/submit_multinode.sh). That task reads SLURM's variables (nodes, node id, first host
of the node list), checks this node (config, data, GPUs) and starts `accelerate launch`: one process per GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from facegen_dist.errors import FacegenError

DEFAULT_PORT_BASE = 20000
# Rank 0 writes this file after a preemption checkpoint; the launcher of node 0 then requeues the job.
PREEMPT_MARKER_ENV = "FACEGEN_PREEMPT_MARKER"


@dataclass(frozen=True)
class Rendezvous:
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03],gpu7` -> hostnames, as SLURM itself expands them."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise FacegenError(f"cannot expand SLURM_JOB_NODELIST '{nodelist}' with scontrol: {error}") from None
    return out.split()


def rendezvous_port(job_id: str) -> int:
    """A port from the job id, so two jobs sharing a node do not collide (ids that are not numbers: hashed)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return DEFAULT_PORT_BASE + number % 20000


def rendezvous(env: dict | None = None) -> Rendezvous:
    """Where the processes of this job meet: the first node of the allocation, a port derived from the job id."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        raise FacegenError(
            "facegen launch runs inside a SLURM job (under srun); outside one, use `accelerate launch train.py`"
        )
    num_machines = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env else [socket.gethostname()]
    main_ip = env.get("FACEGEN_MAIN_ADDR") or hosts[0]
    port = int(env.get("FACEGEN_MAIN_PORT") or rendezvous_port(env["SLURM_JOB_ID"]))
    return Rendezvous(num_machines, int(env.get("SLURM_NODEID", 0)), main_ip, port)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def processes_per_node(requested: int, cpu: bool, env: dict | None = None) -> int:
    """One process per GPU allocated on this node; on CPU, `requested` (default 1)."""
    env = os.environ if env is None else env
    if cpu:
        return max(1, requested)
    gpus = visible_gpus()
    allocated = int(env.get("SLURM_GPUS_ON_NODE") or 0)
    wanted = requested or allocated or gpus
    if gpus == 0:
        raise FacegenError(
            f"no GPU visible (SLURM_GPUS_ON_NODE={allocated or 'unset'}); ask for GPUs (--gpus-per-node) or train on CPU with FACEGEN_CPU=1"
        )
    if wanted > gpus:
        raise FacegenError(f"{wanted} processes per node asked for, {gpus} GPU(s) visible")
    return wanted


def check_train_args(train_args: list[str]) -> None:
    """What would stop the run on this node, found before any process starts: config, data."""
    from facegen_dist.config import EMBEDDED_PREFIX, load_config
    from facegen_dist.data.shards import split_shards

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", action="append", default=[])
    known, overrides = parser.parse_known_args(train_args)
    cfg = load_config(known.config, overrides)
    if not cfg.data.path.startswith(EMBEDDED_PREFIX):
        split_shards(cfg.data.path, "train")


def accelerate_command(args, rdzv: Rendezvous, procs_per_node: int) -> list[str]:
    # run_accelerate_launch(), with this interpreter whatever PATH says
    command = [
        sys.executable,
        "-m",
        "facegen_dist.cluster.slurm",
    ]
    if args.accelerate_config:
        command += ["--config_file", args.accelerate_config]
    total = rdzv.num_machines * procs_per_node
    command += [
        "--num_machines",
        str(rdzv.num_machines),
        "--machine_rank",
        str(rdzv.machine_rank),
        "--num_processes",
        str(total),
        "--main_process_ip",
        rdzv.main_process_ip,
        "--main_process_port",
        str(rdzv.main_process_port),
        "--dynamo_backend",
        "no",
    ]
    if total > 1 and not args.accelerate_config:
        command.append("--multi_gpu")  # with ACCELERATE_USE_CPU this is gloo over CPU processes
    if args.mixed_precision or not args.accelerate_config:  # the config's train.precision wins unless it is "auto"
        command += ["--mixed_precision", args.mixed_precision or "no"]
    return command + ["-m", "facegen_dist.cli", *args.command]


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def start_node(command: list[str], rdzv: Rendezvous, cpu: bool) -> int:
    """Run `command` (accelerate_command's) as this node's launcher; requeue the job if training was preempted."""
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    marker = Path(tempfile.mkdtemp(prefix="facegen-launch-")) / "preempted"
    os.environ[PREEMPT_MARKER_ENV] = str(marker)
    if rdzv.machine_rank == 0:
        print(
            f"facegen launch: {rdzv.num_machines} node(s), main {rdzv.main_process_ip}:{rdzv.main_process_port}; {' '.join(command)}",
            file=sys.stderr,
            flush=True,
        )
    # SLURM signals every process of the job step, and torchrun's agent inside `accelerate launch` would die of
    # SIGUSR1 (no handler), taking the workers with it. The agent inherits "ignore"; each training process
    # installs its own handler (cluster/preemption.py), checkpoints at a step boundary and exits.
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    try:
        returncode = subprocess.call(command)
    except OSError as error:
        raise FacegenError(f"cannot start accelerate: {error}") from None
    if returncode == 0 and marker.is_file():
        # Requeue only now, with every training process gone: requeueing kills the job's processes,
        # and torchrun's agent answers that SIGTERM with a traceback.
        print(f"facegen launch: {requeue_this_job()}", file=sys.stderr, flush=True)
    shutil.rmtree(marker.parent, ignore_errors=True)
    return returncode


def run_accelerate_launch(argv: list[str]) -> int:
    """`accelerate launch` with torchrun's own endings as one line naming this node instead of a traceback.

    When another node's task fails, SLURM ends the step with SIGTERM and torchrun's agent raises
    through accelerate (a 15-line traceback that hides srun's "error: <node>: task N" line).
    """
    from subprocess import CalledProcessError

    from accelerate.commands.launch import main
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.argv = ["accelerate launch", *argv]
    where = f"facegen launch: node {node_name()}:"
    try:
        main()
    except SignalException as stopped:
        name = signal.Signals(stopped.sigval).name
        print(
            f"{where} stopped by {name} (the job step was ended: a task failed on another node, or the job was cancelled)",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        cause = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(
            f"{where} the training process of rank {rank} failed first ({cause}); its own error is above",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except CalledProcessError as failed:  # one process: accelerate runs it with subprocess
        print(
            f"{where} the training process failed (exit code {failed.returncode}); its own error is above",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def after_preemption() -> str:
    """Rank 0, checkpoint written: tell `facegen launch` to requeue, or requeue directly (no launcher)."""
    marker = os.environ.get(PREEMPT_MARKER_ENV)
    if marker and os.environ.get("SLURM_JOB_ID"):
        Path(marker).write_text("preempted\n")
        return "the launcher requeues the job when every process has exited"
    return requeue_this_job()


def requeue_this_job() -> str:
    """After a preemption checkpoint: put this SLURM job back in the queue (same id, SLURM_RESTART_COUNT + 1)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or os.environ.get("FACEGEN_REQUEUE", "1") == "0":
        return "the checkpoint is saved; run the same command to continue"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"scontrol requeue {job_id} failed ({result.stderr.strip() or result.returncode}); resubmit the same script to continue"
    return f"requeued SLURM job {job_id}; it resumes from the checkpoint when it starts again"


if __name__ == "__main__":
    sys.exit(run_accelerate_launch(sys.argv[1:]))
