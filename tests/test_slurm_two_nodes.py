"""Two SLURM nodes for real (../shared/slurm with SLURM_LOCAL_NODES=2): 2 x 2 CPU processes, preempted twice, exact.

Both emulated nodes share this machine's cores, so this tests the rendezvous and SLURM's semantics, not speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import EVAL_TINY, TINY, TINY_VQGAN, read_metrics, run_facegen, run_train
from test_slurm import START, _rows, _sbatch, _wait_done, _wait_for, preempt_twice, submit_and_preempt, submitit_job

pytestmark = pytest.mark.slow

# 200 steps of 4 ranks x 8 images; every step logged.
RUN_ARGS = [
    *TINY,
    "train.precision=no",
    "train.total_images=6400",
    "train.log_every_images=32",
    "train.ckpt_every_images=100000",
    "train.sample_every_images=100000",
    "train.cpu_threads=1",
]
TWO_NODES = [
    "--nodes=2",
    "--gpus-per-node=0",
    "--cpus-per-task=2",
    "--export=ALL,FACEGEN_CPU=1,FACEGEN_PROCS_PER_NODE=2",
]


@pytest.fixture(scope="module")
def two_node_cluster():
    if os.geteuid() != 0 or not shutil.which("apt-get") or not START.exists():
        pytest.skip(f"a local SLURM needs root, apt-get and {START}")
    env = {**os.environ, "SLURM_LOCAL_NODES": "2"}
    result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        pytest.skip(f"a 2-node local SLURM did not start: {result.stderr.strip().splitlines()[-1:]}")
    yield


@pytest.fixture(scope="module")
def two_node_reference(two_node_cluster, tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    job = _sbatch(
        root,
        "vae128.sh",
        *RUN_ARGS,
        f"data.path={tiny_shards}",
        f"run.dir={root}/runs",
        "run.name=ref",
        options=TWO_NODES,
    )
    log = root / f"{job}.out"
    assert _wait_done(job, log, timeout=600) == "COMPLETED", log.read_text()[-4000:]
    return root / "runs" / "ref", log


def test_two_nodes_train_world_size_4_equal_to_one_node_of_4(two_node_reference, tiny_shards, tmp_path):
    run_dir, log = two_node_reference
    text = log.read_text()
    assert "facegen launch: 2 node(s)" in text and "Traceback" not in text, text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["ranks_in_sync"] and summary["images_seen"] == 6400
    # The same world size and global batch on one node: rank r reads the same slots, and sums run in rank order.
    one_node = run_train(tmp_path, *RUN_ARGS, f"data.path={tiny_shards}", "run.name=one", num_processes=4, timeout=900)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    expected, got = read_metrics(tmp_path / "runs" / "one"), read_metrics(run_dir)
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    assert (
        summary["parameter_checksums"]
        == json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())["parameter_checksums"]
    )


def test_two_nodes_preempted_twice_requeue_and_finish_exactly(two_node_reference, tiny_shards, tmp_path):
    reference_dir, _ = two_node_reference
    job = _sbatch(
        tmp_path,
        "vae128.sh",
        *RUN_ARGS,
        f"data.path={tiny_shards}",
        f"run.dir={tmp_path}/runs",
        "run.name=pre",
        options=TWO_NODES,
    )
    run_dir, log = tmp_path / "runs" / "pre", tmp_path / f"{job}.out"
    seconds = preempt_twice(job, run_dir, log, steps_between=30, timeout=600)
    assert _wait_done(job, log, timeout=900) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert text.count("SIGUSR1 received: stopped after step") == 2 and "Traceback" not in text, text[-4000:]
    runs = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-P", "--duplicates", "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    assert runs == ["REQUEUED", "REQUEUED", "COMPLETED"], runs
    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for want, have in zip(expected, got):
        for key in ("loss", "mse", "kl", "images_seen", "grad_norm/autoencoder"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    final, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    assert final["world_size"] == 4 and final["parameter_checksums"] == reference["parameter_checksums"]
    print(f"2 nodes: signal -> resumed: {[round(s, 1) for s in seconds]} s")


@pytest.mark.parametrize("nodes_before, nodes_after", [(2, 1), (1, 2)], ids=["2-nodes-to-1", "1-node-to-2"])
def test_a_run_cancelled_and_resubmitted_on_another_node_count_trains_exactly_its_budget(
    two_node_cluster, tiny_shards, tmp_path, nodes_before, nodes_after
):
    """N nodes x 2 processes, cancelled (plain scancel: no requeue) after a periodic checkpoint, then resubmitted on M nodes x 2."""
    args = [
        *RUN_ARGS,
        "train.total_images=3200",
        "train.ckpt_every_images=640",
        f"data.path={tiny_shards}",
        f"run.dir={tmp_path}/runs",
        "run.name=moved",
    ]
    run_dir = tmp_path / "runs" / "moved"
    job = _sbatch(tmp_path, "vae128.sh", *args, options=[f"--nodes={nodes_before}", *TWO_NODES[1:]])
    log = tmp_path / f"{job}.out"
    _wait_for(
        lambda: list((run_dir / "checkpoints").glob("ckpt-*")), 600, f"a checkpoint of the {nodes_before}-node run", log
    )
    subprocess.run(["scancel", job], check=True)
    assert _wait_done(job, log, timeout=300) == "CANCELLED"
    again = _sbatch(tmp_path, "vae128.sh", *args, options=[f"--nodes={nodes_after}", *TWO_NODES[1:]])
    again_log = tmp_path / f"{again}.out"
    assert _wait_done(again, again_log, timeout=600) == "COMPLETED", again_log.read_text()[-4000:]
    text = again_log.read_text()
    before, after = 2 * nodes_before, 2 * nodes_after
    assert "resumed from" in text, text[-3000:]
    assert (
        f"data layout changed (processes x data workers x batch x shuffle group: {before} x 1 x 8 x 4 -> {after} x 1 x 8 x 4)"
        in text
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["world_size"] == after
        and summary["ranks_in_sync"]
        and 3200 <= summary["images_seen"] < 3200 + 8 * after
    )
    rows = read_metrics(run_dir)
    assert rows[0]["world_size"] == before and rows[-1]["world_size"] == after
    assert rows[-1]["images_seen"] == summary["images_seen"]


def _job_processes(job: str, node_id: str | None = None) -> list[int]:
    """Processes of this job's tasks (their environment says SLURM_JOB_ID=job), on node `node_id` or on any node."""
    wanted = {f"SLURM_JOB_ID={job}".encode()} | ({f"SLURM_NODEID={node_id}".encode()} if node_id is not None else set())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            found.append(int(proc.name))
    return found


def test_a_node_lost_mid_run_ends_the_job_on_both_nodes_and_the_same_command_resumes_exactly(
    two_node_reference, tiny_shards, tmp_path
):
    """Every process of node 2 killed with SIGKILL after a checkpoint: node 1 must not hang in a collective."""
    reference_dir, _ = two_node_reference
    args = [
        *RUN_ARGS,
        "train.ckpt_every_images=640",
        f"data.path={tiny_shards}",
        f"run.dir={tmp_path}/runs",
        "run.name=lost",
    ]
    run_dir = tmp_path / "runs" / "lost"
    job = _sbatch(tmp_path, "vae128.sh", *args, options=TWO_NODES)
    log = tmp_path / f"{job}.out"
    _wait_for(lambda: len(_rows(run_dir)) >= 30, 600, "30 steps (a checkpoint at 20)", log)
    victims = _job_processes(job, node_id="1")
    assert len(victims) >= 3, victims  # facegen launch, accelerate/torchrun, 2 training processes
    lost = time.time()
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    state = _wait_done(job, log, timeout=300)
    _wait_for(lambda: not _job_processes(job), 120, "every process of the job to end")
    seconds = time.time() - lost
    assert state == "FAILED", state
    assert seconds < 60, f"the job took {seconds:.1f} s to end after its second node was lost"
    text = log.read_text()
    assert "srun: error: vm2: task 1: Killed" in text, text[-3000:]  # SLURM's own line names the node and the cause
    assert "facegen launch: node vm1: " in text and "Traceback" not in text, text[-3000:]  # node 1's ending: one line
    assert "non-finite" not in text, text[-3000:]  # the gather that failed raised; it did not average garbage

    again = _sbatch(tmp_path, "vae128.sh", *args, options=TWO_NODES)  # the same command, resubmitted
    again_log = tmp_path / f"{again}.out"
    assert _wait_done(again, again_log, timeout=600) == "COMPLETED", again_log.read_text()[-4000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in again_log.read_text()
    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    final = json.loads((run_dir / "summary.json").read_text())
    assert (
        final["parameter_checksums"] == json.loads((reference_dir / "summary.json").read_text())["parameter_checksums"]
    )
    print(f"node lost -> job ended on both nodes: {seconds:.1f} s")


def test_submit_on_two_nodes_preempted_requeued_finishes_exactly(two_node_reference, tiny_shards, tmp_path):
    """`facegen submit --nodes 2` (submitit: one task per process, 2 nodes x 2), preempted as submitit does it, requeued, finished."""
    reference_dir, _ = two_node_reference
    job_id, run_dir, _ = submit_and_preempt(
        tmp_path, ["--nodes", "2"], [*RUN_ARGS, f"data.path={tiny_shards}"], steps_before=30, timeout=600
    )
    runs = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "State,NNodes"], capture_output=True, text=True
    ).stdout.split()
    assert runs == ["REQUEUED|2", "COMPLETED|2"], runs
    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["world_size"] == 4 and final["ranks_in_sync"]
    assert (
        final["parameter_checksums"] == json.loads((reference_dir / "summary.json").read_text())["parameter_checksums"]
    )
    assert submitit_job(run_dir, job_id).result()["images_seen"] == 6400


# slurm/vqgan512.sh with configs/vqgan_ffhq512.yaml as they are (bf16, activation checkpointing, 2 x 4 micro-batches,
# hinge GAN with a delayed discriminator); only sizes shrunk: 32 px avatars, a tiny VQ-GAN, the tiny perceptual stand-in.
VQGAN512_TINY = [
    *(arg for arg in TINY_VQGAN if arg.startswith(("data.", "model.", "log.progress", "log.num_grid"))),
    "model.disc_start_images=96",
    "train.total_images=192",
    "train.ckpt_every_images=96",
    "train.sample_every_images=192",
    "train.log_every_images=16",
    "train.cpu_threads=1",
]


def test_sbatch_vqgan512_the_headline_script_runs_on_two_nodes(two_node_cluster, tiny_shards, tmp_path):
    job = _sbatch(
        tmp_path,
        "vqgan512.sh",
        *VQGAN512_TINY,
        f"data.path={tiny_shards}",
        f"run.dir={tmp_path}/runs",
        options=["--gpus-per-node=0", "--cpus-per-task=1", "--export=ALL,FACEGEN_CPU=1,FACEGEN_PROCS_PER_NODE=1"],
    )
    log = tmp_path / f"{job}.out"
    assert _wait_done(job, log, timeout=900) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert "facegen launch: 2 node(s)" in text and "Traceback" not in text, text[-3000:]
    run_dir = tmp_path / "runs" / "vqgan_ffhq512"  # the config's run name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and summary["images_seen"] == 192
    saved = (run_dir / "config.yaml").read_text()
    for kept in (
        "precision: bf16",
        "activation_checkpointing: true",
        "grad_accum: 4",
        "batch_size: 2",
        "disc_loss: hinge",
    ):
        assert kept in saved, kept
    rows = read_metrics(run_dir)
    assert rows[-1]["images_seen"] == 192 and rows[-1]["generator/adaptive_weight"] > 0
    # 16 images a step; D starts at 96
    assert ["discriminator/d_loss" in row for row in rows] == [False] * 6 + [True] * 6
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*")) == [
        "ckpt-000000000096",
        "ckpt-000000000192",
    ]


def test_sbatch_eval_on_two_nodes_equals_one_process(two_node_reference, tiny_shards, tmp_path):
    """slurm/eval.sh across 2 nodes: samples sharded over both, features gathered; the metrics of one process."""
    reference_dir, _ = two_node_reference
    run = tmp_path / "ref"
    shutil.copytree(reference_dir, run, ignore=shutil.ignore_patterns("eval"))
    options = [
        "--nodes=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--export=ALL,FACEGEN_CPU=1,FACEGEN_PROCS_PER_NODE=1,RUN={run}",
    ]
    eval_args = ["--metrics=fid,kid,prc", "--num", "48", *EVAL_TINY, f"eval.cache_dir={tmp_path / 'cache'}"]
    job = _sbatch(tmp_path, "eval.sh", *eval_args, options=options)
    log = tmp_path / f"{job}.out"
    assert _wait_done(job, log, timeout=600) == "COMPLETED", log.read_text()[-4000:]
    assert "facegen launch: 2 node(s)" in log.read_text()
    two_nodes = json.loads(max((run / "eval").glob("0*.json")).read_text())
    one = run_facegen(tmp_path, "eval", "--run", str(run), *eval_args)
    assert one.returncode == 0, one.stderr[-3000:]
    one_process = json.loads(max((run / "eval").glob("0*.json")).read_text())
    assert two_nodes["protocol"]["world_size"] == 2 and one_process["protocol"]["world_size"] == 1
    assert two_nodes["metrics"].keys() == one_process["metrics"].keys() and "fd_tiny-test" in two_nodes["metrics"]
    for name, value in one_process["metrics"].items():
        assert two_nodes["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


def test_a_node_that_fails_at_start_up_ends_the_job_in_one_line_naming_it(two_node_cluster, tiny_shards, tmp_path):
    """The data mount missing on node 2 only (data.path names the node): node 1 must not wait for it at the rendezvous."""
    per_node = tmp_path / "mounts"
    (per_node / "vm1").mkdir(parents=True)
    for shard in tiny_shards.iterdir():
        (per_node / "vm1" / shard.name).symlink_to(shard)
    started = time.time()
    job = _sbatch(
        tmp_path,
        "vae128.sh",
        *RUN_ARGS,
        f"data.path={per_node}/${{oc.env:SLURMD_NODENAME}}",
        f"run.dir={tmp_path}/runs",
        "run.name=half",
        options=TWO_NODES,
    )
    log = tmp_path / f"{job}.out"
    assert _wait_done(job, log, timeout=300) == "FAILED", log.read_text()
    _wait_for(lambda: not _job_processes(job), 120, "every process of the job to end")
    seconds = time.time() - started
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("facegen: error:")]
    assert errors and "node vm2" in errors[0] and f"no shards at '{per_node}/vm2'" in errors[0], text
    assert "Traceback" not in text, text
    assert seconds < 120, seconds
