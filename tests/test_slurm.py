"""SLURM on a real local cluster (../shared/slurm): sbatch scripts, preemption -> requeue -> exact resume, submitit.

The cluster is started once per session (about 15 s cold, under 1 s when already up) and left
running. Tests that need it are skipped, with the reason, only where it cannot be started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, _env, read_metrics, run_facegen, run_train, start_train

START = REPO.parent / "shared" / "slurm" / "start-local-slurm.sh"
pytestmark = pytest.mark.slow

# The tiny VAE on 32 px shards, every step logged; 2 CPU processes. 400 steps: long enough to preempt twice.
RUN_ARGS = [
    *TINY,
    "train.precision=no",
    "train.total_images=6400",
    "train.log_every_images=16",
    "train.ckpt_every_images=100000",
    "train.sample_every_images=100000",
]
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL,FACEGEN_CPU=1,FACEGEN_PROCS_PER_NODE=2"]


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0 or not shutil.which("apt-get") or not START.exists():
        pytest.skip(f"a local SLURM needs root, apt-get and {START}")
    result = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.skip(f"local SLURM did not start: {result.stderr.strip().splitlines()[-1:]}")
    yield


def _sbatch(tmp_path: Path, script: str, *args: str, options: list[str] = CPU_JOB) -> str:
    env = _env()
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(
        ["sbatch", "--parsable", *options, f"--output={tmp_path}/%j.out", str(REPO / "slurm" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def _job_state(job_id: str) -> str:
    """From sacct: the state of the job allocation (COMPLETED, FAILED, RUNNING, PENDING, REQUEUED, ...)."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True
    ).stdout.splitlines()
    return out[-1].split()[0] if out and out[-1].strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED


def _wait_for(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _wait_done(job_id: str, log: Path, timeout: float = 300) -> str:
    return _wait_for(
        lambda: (
            (s := _job_state(job_id)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
            and s
        ),
        timeout,
        f"job {job_id} to end",
        log,
    )


def _rows(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _preempt(job_id: str, burst: int = 1) -> None:
    """scancel --signal=USR1, as SLURM does before a time limit; a burst also lands during the checkpoint."""
    for _ in range(burst):
        subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True)
        time.sleep(0.05)


def preempt_twice(job: str, run_dir: Path, log: Path, steps_between: int, timeout: float) -> list[float]:
    """USR1 the job after every `steps_between` logged steps, twice (the second time a burst that lands during the
    checkpoint), each time waiting for the requeued job to come back; the seconds from signal to its return."""
    seconds = []
    for restart in (1, 2):
        steps_before = len(_rows(run_dir))
        _wait_for(
            lambda: len(_rows(run_dir)) >= steps_before + steps_between,
            timeout,
            f"{steps_between} more steps before preemption {restart}",
            log,
        )
        signalled = time.time()
        _preempt(job, burst=10 if restart == 2 else 1)
        _wait_for(
            lambda: f"SLURM_RESTART_COUNT={restart})" in log.read_text(),
            timeout,
            f"the job to come back with restart {restart}",
            log,
        )
        seconds.append(time.time() - signalled)
    return seconds


def test_usr1_to_the_training_processes_stops_them_together_and_the_rerun_continues_exactly(tiny_shards, tmp_path):
    """No SLURM needed: the signal SLURM sends, delivered by hand to both ranks of an `accelerate launch` run."""
    import signal

    args = [*RUN_ARGS, "train.total_images=1600", f"data.path={tiny_shards}"]
    reference = run_train(tmp_path, *args, "run.name=ref", num_processes=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    launch, run_dir = start_train(tmp_path, *args, "run.name=stopped"), tmp_path / "runs" / "stopped"
    _wait_for(lambda: len(_rows(run_dir)) >= 40 or launch.poll() is not None, 300, "40 steps")
    ranks = subprocess.run(["pgrep", "-P", str(launch.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[1]), signal.SIGUSR1)  # one rank only: the other must stop at the same step
    output = launch.communicate(timeout=300)[0]
    assert launch.returncode == 0, output[-3000:]
    assert (
        "SIGUSR1 received: stopped after step" in output and "the checkpoint is saved; run the same command" in output
    )
    stopped_at = len(read_metrics(run_dir))
    assert stopped_at < 100 and not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints" / f"ckpt-{stopped_at * 16:012d}" / "trainer_state.json").is_file()

    rerun = run_train(tmp_path, *args, "run.name=stopped", num_processes=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {Path('runs/stopped/checkpoints')}" in rerun.stderr
    expected, got = read_metrics(tmp_path / "runs" / "ref"), read_metrics(run_dir)
    assert [row["step"] for row in got] == list(range(1, 101))
    # the resumed noise and data are the uninterrupted run's
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    checksums = [
        json.loads((tmp_path / "runs" / name / "summary.json").read_text())["parameter_checksums"]
        for name in ("ref", "stopped")
    ]
    assert checksums[0] == checksums[1]


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tiny_shards, tmp_path_factory):
    """The uninterrupted run: sbatch slurm/vae128.sh, 2 CPU processes, to completion."""
    root = tmp_path_factory.mktemp("slurm_reference")
    job = _sbatch(root, "vae128.sh", *RUN_ARGS, f"data.path={tiny_shards}", f"run.dir={root}/runs", "run.name=ref")
    log = root / f"{job}.out"
    assert _wait_done(job, log) == "COMPLETED", log.read_text()[-4000:]
    return root / "runs" / "ref", log


def test_sbatch_vae128_completes_with_two_processes(reference_run):
    run_dir, log = reference_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert summary["images_seen"] == 6400 and summary["steps"] == 400
    assert "facegen launch: 1 node(s)" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_sbatch_preempted_twice_requeues_and_matches_uninterrupted_run(reference_run, tiny_shards, tmp_path):
    reference_dir, _ = reference_run
    job = _sbatch(
        tmp_path,
        "vae128.sh",
        *RUN_ARGS,
        f"data.path={tiny_shards}",
        f"run.dir={tmp_path}/runs",
        "run.name=pre",
        "log.wandb=offline",
    )
    run_dir, log = tmp_path / "runs" / "pre", tmp_path / f"{job}.out"
    requeue_seconds = preempt_twice(job, run_dir, log, steps_between=40, timeout=300)
    assert _wait_done(job, log) == "COMPLETED", log.read_text()[-4000:]

    runs = subprocess.run(
        ["sacct", "-j", job, "-X", "-n", "-P", "--duplicates", "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    assert runs == ["REQUEUED", "REQUEUED", "COMPLETED"], runs
    text = log.read_text()
    assert text.count("SIGUSR1 received: stopped after step") == 2
    assert text.count("requeued SLURM job") == 2
    assert "Traceback" not in text
    assert "restart 2," in text  # the batch script's own line on its third start
    expected, got = read_metrics(reference_dir), read_metrics(run_dir)
    assert [row["step"] for row in got] == list(range(1, 401))  # no step lost or counted twice
    for want, have in zip(expected, got):
        for key in ("loss", "mse", "kl", "lr", "images_seen", "grad_norm/autoencoder"):
            assert want[key] == have[key], f"step {want['step']} {key}: {want[key]} != {have[key]}"
    final, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    assert final["images_seen"] == reference["images_seen"] == 6400
    assert final["parameter_checksums"] == reference["parameter_checksums"]
    # One W&B run across the three starts: the id is kept in the checkpoint.
    wandb_ids = {path.name.rsplit("-", 1)[-1] for path in (run_dir / "wandb").glob("offline-run-*")}
    assert len(wandb_ids) == 1, wandb_ids
    print(f"requeue -> resumed: {[round(s, 1) for s in requeue_seconds]} s")


def submit_and_preempt(
    tmp_path: Path, options: list[str], overrides: list[str], steps_before: int, timeout: float
) -> tuple[str, Path, Path]:
    """`facegen submit` a 2-process-per-node run named 'sub', preempt it the way submitit does after `steps_before` steps,
    wait for it to finish; its job id, run folder and task 0's log."""
    result = run_facegen(
        tmp_path,
        "submit",
        *options,
        "--cpu",
        "--tasks-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--partition",
        "debug",
        "--time",
        "60",
        "--config",
        str(REPO / "configs" / "vae_avatars128.yaml"),
        *overrides,
        f"run.dir={tmp_path}/runs",
        "run.name=sub",
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split("facegen submit: job ")[1].split()[0]
    nodes = options[options.index("--nodes") + 1] if "--nodes" in options else "1"
    assert f"job {job_id} ({nodes} node(s) x 2 task(s))" in result.stdout, result.stdout
    run_dir = tmp_path / "runs" / "sub"
    log = run_dir / "submitit" / f"{job_id}_0_log.err"
    _wait_for(lambda: len(_rows(run_dir)) >= steps_before, timeout, f"{steps_before} steps", log)
    submitit_job(run_dir, job_id)._interrupt()  # submitit's own preemption: SIGTERM, then its USR2
    _wait_for(
        lambda: log.exists() and "SLURM_RESTART_COUNT=1)" in log.read_text(), timeout, "the requeued job to resume", log
    )
    assert _wait_done(job_id, log, timeout=2 * timeout) == "COMPLETED", log.read_text()[-4000:]
    return job_id, run_dir, log


def submitit_job(run_dir: Path, job_id: str):
    import submitit

    return submitit.SlurmJob(run_dir / "submitit", job_id)


def test_submitit_preempted_resumes_and_matches_uninterrupted_run(reference_run, tiny_shards, tmp_path):
    reference_dir, _ = reference_run
    job_id, run_dir, _ = submit_and_preempt(
        tmp_path, [], [*RUN_ARGS, f"data.path={tiny_shards}"], steps_before=40, timeout=300
    )
    # submitit's logs start afresh on the requeued run; SLURM's accounting keeps both runs.
    runs = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "--duplicates", "-o", "State"], capture_output=True, text=True
    ).stdout.split()
    assert runs == ["REQUEUED", "COMPLETED"], runs
    got, expected = read_metrics(run_dir), read_metrics(reference_dir)
    assert [row["step"] for row in got] == list(range(1, 401))
    assert [row["loss"] for row in got] == [row["loss"] for row in expected]
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["world_size"] == 2
    assert (
        final["parameter_checksums"] == json.loads((reference_dir / "summary.json").read_text())["parameter_checksums"]
    )
    # rank 0's result, as submitit's client sees it
    assert submitit_job(run_dir, job_id).result()["images_seen"] == 6400


def test_submit_local_runs_two_processes_without_slurm(tiny_shards, tmp_path):
    result = run_facegen(
        tmp_path,
        "submit",
        "--local",
        "--cpu",
        "--tasks-per-node",
        "2",
        "--config",
        str(REPO / "configs" / "vae_avatars64.yaml"),
        *TINY,
        "train.total_images=320",
        f"data.path={tiny_shards}",
        "run.name=local",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 320 images, world size 2" in result.stdout
    summary = json.loads((tmp_path / "runs" / "local" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]


def test_bad_submissions_fail_in_one_line_and_submit_nothing(slurm_cluster, tiny_shards, tmp_path):
    config = str(REPO / "configs" / "vae_avatars64.yaml")
    cases = {
        "no such file": ["submit", "--config", "missing.yaml"],
        "unknown partition 'nope'": ["submit", "--config", config, "--partition", "nope", "--cpu"],
        # no GPUs on this cluster
        "submission refused": [
            "submit",
            "--config",
            config,
            "--gpus-per-node",
            "1",
            "--partition",
            "debug",
        ],
        "no shards": ["submit", "--config", config, "--cpu", "data.path=/nonexistent/shards"],
        "inside a SLURM job": ["launch", "--", "train", "--config", config],
    }
    jobs_before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    for expected, args in cases.items():
        result = run_facegen(tmp_path, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("facegen: error:") and expected in lines[0], (
            args,
            result.stderr,
        )
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == jobs_before


def test_sbatch_bad_node_conditions_fail_cleanly_and_overwrite_nothing(slurm_cluster, tiny_shards, tmp_path):
    run_dir = tmp_path / "runs" / "kept"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("precious: true\n")
    cases = {
        # data missing on the node
        "no shards at": (CPU_JOB, ["data.path=/nonexistent/shards"]),
        # GPUs expected (FACEGEN_CPU unset) on a node with none
        "no GPU visible": (["--gpus-per-node=0", "--cpus-per-task=2"], [f"data.path={tiny_shards}"]),
        # a config file missing on the node
        "no such file": (
            CPU_JOB[:2] + ["--export=ALL,FACEGEN_CPU=1,CONFIG=configs/missing.yaml"],
            [f"data.path={tiny_shards}"],
        ),
    }
    for expected, (options, args) in cases.items():
        job = _sbatch(tmp_path, "vae128.sh", *TINY, *args, f"run.dir={tmp_path}/runs", "run.name=kept", options=options)
        log = tmp_path / f"{job}.out"
        assert _wait_done(job, log, timeout=120) == "FAILED", log.read_text()
        text = log.read_text()
        assert "facegen: error: " in text and expected in text, text
        assert "Traceback" not in text
    assert (run_dir / "config.yaml").read_text() == "precious: true\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_launch_builds_the_multinode_rendezvous_from_slurm_variables(slurm_cluster, tmp_path):
    env = {
        **_env(),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "facegen_dist.cli",
            "launch",
            "--cpu",
            "--procs-per-node",
            "4",
            "--dry-run",
            "--",
            "eval",
            "--run",
            "runs/x",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    value = {
        flag: command[command.index(flag) + 1]
        for flag in ("--num_machines", "--machine_rank", "--num_processes", "--main_process_ip", "--main_process_port")
    }
    assert value == {
        "--num_machines": "2",
        "--machine_rank": "1",
        "--num_processes": "8",
        "--main_process_ip": "gpu07",
        "--main_process_port": str(20000 + 4242),
    }
    assert command[-4:] == ["facegen_dist.cli", "eval", "--run", "runs/x"]
