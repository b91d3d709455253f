"""Test helpers: the tiny model settings and how tests launch real training processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = str(REPO / "train.py")

# A small model on 32 px images: fast on 2 CPU cores, still the real code path.
TINY = [
    "data.resolution=32",
    "model.channels=[8,16,16,32,32]",
    "model.latent_dim=16",
    "train.batch_size=8",
    "optim.lr=2e-3",
    "optim.warmup_images=0",
    "optim.schedule=constant",
    "log.wandb=off",
    "log.progress=false",
    "log.num_grid_images=16",
    "data.num_workers=1",
]


# The tiny VQ family: settings shared by the VQ training, latent and prior tests.
COMMON = [
    "data.resolution=32",
    "train.batch_size=8",
    "log.wandb=off",
    "log.progress=false",
    "log.num_grid_images=16",
    "data.num_workers=1",
]
TINY_VQVAE2 = [
    *COMMON,
    "model.name=vqvae2",
    "model.channels=16",
    "model.res_blocks=1",
    "model.res_channels=8",
    "model.embed_dim=8",
    "model.num_codes=32",
    "model.downsample=4",
    "model.dead_code_steps=10",
    "optim.lr=2e-3",
    "optim.warmup_images=0",
]

# The two GAN-style baselines at 32 px.
TINY_DCGAN = [
    *COMMON,
    "model.name=dcgan",
    "model.latent_dim=16",
    "model.gen_channels=8",
    "model.disc_channels=8",
    "optim.lr=2e-4",
    "optim.warmup_images=0",
]
TINY_INTROVAE = [
    *COMMON,
    "model.name=introvae",
    "model.latent_dim=16",
    "model.channels=[8,16,16]",
    "model.margin=10",
    "model.beta=0.5",
    "model.vae_images=160",
    "optim.lr=1e-3",
    "optim.warmup_images=0",
]

# A tiny VQ-GAN at 32 px: f=4 (8x8 codes of 64), attention at 8x8, the tiny perceptual stand-in.
TINY_VQGAN = [
    "model.name=vqgan",
    "data.resolution=32",
    "model.channels=16",
    "model.channel_mult=[1,2,2]",
    "model.attn_resolutions=[8]",
    "model.z_channels=16",
    "model.embed_dim=16",
    "model.num_codes=64",
    "model.perceptual=tiny",
    "model.disc_channels=16",
    "model.disc_layers=2",
    "train.batch_size=8",
    "optim.lr=1e-3",
    "optim.warmup_images=0",
    "optim.schedule=constant",
    "log.wandb=off",
    "log.progress=false",
    "log.num_grid_images=8",
    "data.num_workers=1",
]


# Metrics with the tiny feature extractor of tests/plugins (on PYTHONPATH through _env): no Inception weights needed.
EVAL_TINY = [
    "eval.extractor=tiny-test",
    "eval.plugins=[facegen_test_extractor]",
    "eval.batch_size=16",
    "eval.split=val",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leave_two_rank_group(rank: int, rank1_done, queue) -> None:
    """End a spawned gloo worker of a two-rank test once it has put its result on `queue`.

    Rank 0 hosts the TCP store, so it leaves last; each process then ends without the interpreter's
    teardown, which gloo's threads can abort (facegen_dist.cluster.teardown), after `queue` is flushed.
    """
    import torch.distributed as dist

    from facegen_dist.cluster.teardown import end_without_teardown

    dist.barrier()
    if rank == 0:
        rank1_done.wait(timeout=60)
    dist.destroy_process_group()
    if rank == 1:
        rank1_done.set()
    queue.close()
    queue.join_thread()  # the result reaches the pipe before os._exit
    end_without_teardown(0)


ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"


def _env(use_cpu: bool = True) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    else:  # DeepSpeed: accelerate drops it silently under ACCELERATE_USE_CPU; with no GPU it picks its CPU accelerator
        env.pop("ACCELERATE_USE_CPU", None)
    env.pop("WANDB_API_KEY", None)
    # tests/plugins holds the tiny feature extractor that eval tests register through eval.plugins
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests" / "plugins"), env.get("PYTHONPATH")]))
    return env


def accelerate_command(
    num_processes: int,
    *args: str,
    script: list[str] | None = None,
    mixed_precision: str = "no",
    strategy: str | None = None,
) -> list[str]:
    """`accelerate launch` as a user types it: two real CPU processes need --multi_gpu + ACCELERATE_USE_CPU.

    `script` defaults to train.py; ["-m", "facegen_dist.cli"] launches the facegen CLI instead.
    `strategy` names a configs/accelerate/ file (ds_zero2, ...), passed as --config_file.
    """
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher), "launch"]
    if strategy:
        command += ["--config_file", str(ACCELERATE_CONFIGS / f"{strategy}.yaml")]
    command += [
        "--num_machines",
        "1",
        "--mixed_precision",
        mixed_precision,
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    ]
    if num_processes > 1:
        command += [] if strategy else ["--multi_gpu"]
        command += ["--main_process_port", str(free_port())]
    return command + (script or [TRAIN_PY]) + list(args)


def run_train(
    cwd: Path,
    *args: str,
    num_processes: int = 1,
    timeout: int = 600,
    launcher: bool = False,
    mixed_precision: str = "no",
    strategy: str | None = None,
) -> subprocess.CompletedProcess:
    """train.py in one plain process, or under `accelerate launch` (always when num_processes > 1 or a strategy is named)."""
    if num_processes == 1 and not launcher and not strategy:
        command = [sys.executable, TRAIN_PY, *args]
    else:
        command = accelerate_command(num_processes, *args, mixed_precision=mixed_precision, strategy=strategy)
    return subprocess.run(
        command, cwd=cwd, env=_env(use_cpu=_use_cpu_flag(strategy)), capture_output=True, text=True, timeout=timeout
    )


def _use_cpu_flag(strategy: str | None) -> bool:
    """ACCELERATE_USE_CPU for plain DDP only: it silently turns a DeepSpeed or FSDP config into DDP on CPU."""
    return strategy in (None, "ddp")


def run_facegen(cwd: Path, *args: str, num_processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """The `facegen` CLI, in one process or under `accelerate launch -m facegen_dist.cli`."""
    if num_processes == 1:
        command = [sys.executable, "-m", "facegen_dist.cli", *args]
    else:
        command = accelerate_command(num_processes, *args, script=["-m", "facegen_dist.cli"])
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_train(cwd: Path, *args: str, num_processes: int = 2, strategy: str | None = None) -> subprocess.Popen:
    """Start a training launch in its own process group (so the test can kill -9 all of it)."""
    return subprocess.Popen(
        accelerate_command(num_processes, *args, strategy=strategy),
        cwd=cwd,
        env=_env(use_cpu=_use_cpu_flag(strategy)),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill9_after_first_checkpoint(launch: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    """Wait for the run's first checkpoint, then SIGKILL the launcher and every rank, with no chance to clean up."""
    import time

    deadline = time.time() + timeout
    while not list((run_dir / "checkpoints").glob("ckpt-*")) and launch.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert launch.poll() is None, "training ended before the test could kill it:\n" + launch.stdout.read()[-3000:]
    kill9_tree(launch)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill9_tree(launch: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it. torchrun starts each rank in a session of its own,
    so killing the launcher's process group alone leaves the ranks training on as orphans."""
    import signal

    pids = _descendants(launch.pid)
    os.killpg(launch.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launch.wait(timeout=60)


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_in_process(tiny_shards, run_dir, total_images: int, *extra: str, model: list[str] = TINY) -> dict:
    """A tiny VAE trained by the Trainer in this process (use with the in_process_accelerator fixture)."""
    from facegen_dist.config import load_config
    from facegen_dist.train.loop import run

    cfg = load_config(
        [],
        [
            *model,
            f"data.path={tiny_shards}",
            f"run.dir={run_dir.parent}",
            f"run.name={run_dir.name}",
            f"train.total_images={total_images}",
            "train.ckpt_every_images=32",
            "train.log_every_images=16",
            "train.sample_every_images=1000000",
            "train.cpu_threads=1",
            *extra,
        ],
    )
    return run(cfg)


def wandb_records(run_file: Path):
    """The protobuf records of an offline W&B run file (run-<id>.wandb): its LevelDB-style log, read here because
    wandb 0.31 ships no reader (32 KiB blocks; each chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
