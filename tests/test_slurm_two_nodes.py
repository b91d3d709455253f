"""Two SLURM nodes for real (../shared/slurm with SLURM_LOCAL_NODES=2): 2 x 2 CPU processes, preempted twice, exact.

Both emulated nodes share this machine's cores, so this tests the rendezvous and SLURM's semantics, not speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import TINY, read_metrics, run_train
from test_slurm import START, _sbatch, _wait_done, _wait_for, preempt_twice

pytestmark = pytest.mark.slow

# 200 steps of 4 ranks x 8 images; every step logged.
RUN_ARGS = [*TINY, "train.precision=no", "train.total_images=6400", "train.log_every_images=32",
            "train.ckpt_every_images=100000", "train.sample_every_images=100000", "train.cpu_threads=1"]
TWO_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL,FACEGEN_CPU=1,FACEGEN_PROCS_PER_NODE=2"]


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
    job = _sbatch(root, "vae128.sh", *RUN_ARGS, f"data.path={tiny_shards}", f"run.dir={root}/runs", "run.name=ref", options=TWO_NODES)
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
    assert summary["parameter_checksums"] == json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())["parameter_checksums"]


def test_two_nodes_preempted_twice_requeue_and_finish_exactly(two_node_reference, tiny_shards, tmp_path):
    reference_dir, _ = two_node_reference
    job = _sbatch(tmp_path, "vae128.sh", *RUN_ARGS, f"data.path={tiny_shards}", f"run.dir={tmp_path}/runs", "run.name=pre", options=TWO_NODES)
    run_dir, log = tmp_path / "runs" / "pre", tmp_path / f"{job}.out"
    seconds = preempt_twice(job, run_dir, log, steps_between=30, timeout=600)
    assert _wait_done(job, log, timeout=900) == "COMPLETED", log.read_text()[-4000:]
    text = log.read_text()
    assert text.count("SIGUSR1 received: stopped after step") == 2 and "Traceback" not in text, text[-4000:]
    runs = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "--duplicates", "-o", "State"], capture_output=True, text=True).stdout.split()
    assert runs == ["REQUEUED", "REQUEUED", "COMPLETED"], runs
    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for want, have in zip(expected, got):
        for key in ("loss", "mse", "kl", "images_seen", "grad_norm/autoencoder"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    final, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    assert final["world_size"] == 4 and final["parameter_checksums"] == reference["parameter_checksums"]
    print(f"2 nodes: signal -> resumed: {[round(s, 1) for s in seconds]} s")


def test_a_two_node_run_cancelled_and_resubmitted_on_one_node_trains_exactly_its_budget(two_node_cluster, tiny_shards, tmp_path):
    """2 nodes x 2 processes, cancelled (plain scancel: no requeue) after a periodic checkpoint, then resubmitted on 1 node x 2."""
    args = [*RUN_ARGS, "train.total_images=3200", "train.ckpt_every_images=640", f"data.path={tiny_shards}", f"run.dir={tmp_path}/runs",
            "run.name=moved"]
    run_dir = tmp_path / "runs" / "moved"
    job = _sbatch(tmp_path, "vae128.sh", *args, options=TWO_NODES)
    log = tmp_path / f"{job}.out"
    _wait_for(lambda: list((run_dir / "checkpoints").glob("ckpt-*")), 600, "a checkpoint of the 2-node run", log)
    subprocess.run(["scancel", job], check=True)
    assert _wait_done(job, log, timeout=300) == "CANCELLED"
    one_node = ["--nodes=1", *TWO_NODES[1:]]
    again = _sbatch(tmp_path, "vae128.sh", *args, options=one_node)
    again_log = tmp_path / f"{again}.out"
    assert _wait_done(again, again_log, timeout=600) == "COMPLETED", again_log.read_text()[-4000:]
    text = again_log.read_text()
    assert "resumed from" in text and "data layout changed (processes x data workers x batch x shuffle group: 4 x 1 x 8 x 4 -> 2 x 1 x 8 x 4)" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] and 3200 <= summary["images_seen"] < 3200 + 16
    rows = read_metrics(run_dir)
    assert [row["world_size"] for row in rows][0] == 4 and rows[-1]["world_size"] == 2
