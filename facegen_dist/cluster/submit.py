"""`facegen submit`: one command from a config to a running SLURM job (submitit), or --local.

submitit starts one task per GPU on every node; each task turns its JobEnvironment into the variables
Accelerate reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and runs the same training loop as
`accelerate launch train.py` (DINOv2's run/submit.py does the same).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from facegen_dist.cluster.slurm import rendezvous_port, visible_gpus
from facegen_dist.errors import FacegenError

SIGNAL_LEAD_SECONDS = 120


def parse_time_minutes(text: str) -> int:
    """SLURM's time formats: MM, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise FacegenError(f"--time: '{text}' is not a SLURM time (e.g. 4:00:00, 90, 1-12:00:00)")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is None and second is None:
        return first  # minutes
    if days is not None:
        hours, minutes, seconds = first, second or 0, third or 0
    elif third is None:
        hours, minutes, seconds = 0, first, second  # MM:SS
    else:
        hours, minutes, seconds = first, second, third
    return max(1, (days or 0) * 1440 + hours * 60 + minutes + (seconds + 59) // 60)


def check_partition(partition: str) -> None:
    try:
        listed = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        raise FacegenError(f"cannot reach SLURM (sinfo: {error}); use --local to run here") from None
    if listed.returncode != 0:
        raise FacegenError(f"sinfo failed: {listed.stderr.strip()}")
    partitions = sorted(set(listed.stdout.split()))
    if partition and partition not in partitions:
        raise FacegenError(
            f"--partition: unknown partition '{partition}'; this cluster has: {', '.join(partitions) or 'none'}"
        )


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 into a temporary file (children such as sbatch write there); its text lands in the yielded list."""
    captured: list[str] = []
    with tempfile.TemporaryFile("w+") as handle:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(handle.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            handle.seek(0)
            captured.append(handle.read())


class TrainingJob:
    """What every task of the job runs. Picklable; requeued jobs run it again and resume."""

    def __init__(self, config_files: list[str], overrides: list[str], workdir: str, cpu: bool, gpus_per_node: int):
        self.config_files, self.overrides, self.workdir = config_files, overrides, workdir
        self.cpu, self.gpus_per_node = cpu, gpus_per_node

    def _distributed_env(self) -> None:
        import submitit

        job = submitit.JobEnvironment()
        hosts = job.hostnames
        os.environ.update(
            RANK=str(job.global_rank),
            LOCAL_RANK=str(job.local_rank),
            WORLD_SIZE=str(job.num_tasks),
            LOCAL_WORLD_SIZE=str(job.num_tasks // max(1, job.num_nodes)),
            MASTER_ADDR="127.0.0.1" if len(hosts) <= 1 else hosts[0],
            MASTER_PORT=os.environ.get("FACEGEN_MAIN_PORT") or str(rendezvous_port(job.raw_job_id)),
        )
        if self.cpu:
            os.environ["ACCELERATE_USE_CPU"] = "true"
        else:
            if visible_gpus() < max(1, self.gpus_per_node):
                raise FacegenError(
                    f"node {job.hostname}: {self.gpus_per_node} GPU(s) per node asked for, {visible_gpus()} visible"
                )

    def __call__(self) -> dict:
        from facegen_dist.cluster.preemption import PreemptionWatcher
        from facegen_dist.config import load_config
        from facegen_dist.train.loop import run

        os.chdir(self.workdir)
        # Replaces submitit's SIGUSR2 handler while the run trains: that one would requeue at once, from inside
        # whatever the step was doing. Here all ranks finish the step and checkpoint; submitit's runs after.
        preemption = PreemptionWatcher()  # before anything slow: a signal during start-up is kept
        self._distributed_env()
        result = run(load_config(self.config_files, self.overrides), preemption)
        if result.get("preempted"):
            import signal

            signum = preemption.received or signal.SIGUSR2
            handler = preemption.previous_handler(signum)
            preemption.restore()
            if callable(handler):
                handler(signum, None)  # submitit's: checkpoint() + requeue + exit on rank 0; returns on the others
        return result

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption/timeout: requeue the same job (it resumes from the run's checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            TrainingJob(self.config_files, self.overrides, self.workdir, self.cpu, self.gpus_per_node)
        )


def submit_training(
    cfg,
    config_files: list[str],
    overrides: list[str],
    *,
    nodes: int,
    tasks_per_node: int,
    gpus_per_node: int,
    cpu: bool,
    cpus_per_task: int,
    mem_gb: int,
    timeout_min: int,
    partition: str,
    account: str,
    local: bool,
):
    """Submit TrainingJob for the loaded config `cfg` to SLURM (or submitit's local executor); returns (job, log folder)."""
    import submitit

    folder = Path(cfg.run.dir) / cfg.run.name / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if local else "slurm")
    params = dict(
        name=f"facegen-{cfg.run.name}",
        nodes=nodes,
        tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task,
        timeout_min=timeout_min,
    )
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if mem_gb:
        params["mem_gb"] = mem_gb
    if not local:
        params.update(slurm_signal_delay_s=SIGNAL_LEAD_SECONDS)
        if partition:
            params["slurm_partition"] = partition
        if account:
            params["slurm_account"] = account
    elif nodes != 1:
        raise FacegenError("--local runs on this machine: --nodes must be 1")
    executor.update_parameters(**params)
    configs = [str(Path(c).resolve()) for c in config_files]
    # sbatch writes its refusal to our stderr; it goes into our one line instead
    with _stderr_captured() as sbatch_stderr:
        try:
            job = executor.submit(TrainingJob(configs, list(overrides), os.getcwd(), cpu, gpus_per_node))
        except Exception as error:  # noqa: BLE001 — sbatch's refusal comes back as submitit's FailedJobError
            error_text = error
        else:
            error_text = None
    if error_text is not None:
        lines = [line for line in ("".join(sbatch_stderr) + "\n" + str(error_text)).splitlines() if line.strip()]
        raise FacegenError(f"submission refused: {lines[0] if lines else error_text}")
    return job, folder


def job_summary(job, folder: Path) -> dict:
    """Wait for `job`; the summary its rank 0 returned ({} if none did)."""
    try:
        results = job.results()
    except Exception as error:  # noqa: BLE001 — a failed task: submitit re-raises its error text
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise FacegenError(
            f"job {job.job_id} failed: {lines[-1] if lines else error} (logs: {folder}/{job.job_id}_*_log.err)"
        ) from None
    return next((r for r in results if r), {})
