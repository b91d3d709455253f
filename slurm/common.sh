# Sourced by every sbatch script here: the parts all facegen jobs share. Nothing to edit;
# set these in the environment of `sbatch` (it exports them) to change them:
#   FACEGEN_ROOT             the facegen_dist checkout (default: the folder you ran sbatch in)
#   FACEGEN_VENV             a virtualenv to activate on the nodes (default: whatever python is on PATH)
#   FACEGEN_PROCS_PER_NODE   processes per node (default: the GPUs SLURM gave the node)
#   FACEGEN_CPU=1            train on CPU processes (gloo) instead of GPUs
#   FACEGEN_ACCELERATE_CONFIG  e.g. configs/accelerate/ds_zero2.yaml
#   FACEGEN_MAIN_PORT        rendezvous port (default: 20000 + job id % 20000)
set -euo pipefail
cd "${FACEGEN_ROOT:-$SLURM_SUBMIT_DIR}"
if [ ! -f facegen_dist/__init__.py ]; then
    echo "facegen: error: $PWD is not a facegen_dist checkout; run sbatch from it or set FACEGEN_ROOT" >&2
    exit 2
fi
if [ -n "${FACEGEN_VENV:-}" ]; then
    source "$FACEGEN_VENV/bin/activate"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE="${WANDB_MODE:-offline}"
echo "facegen: job ${SLURM_JOB_ID} '${SLURM_JOB_NAME}' on ${SLURM_JOB_NODELIST}, restart ${SLURM_RESTART_COUNT:-0}, $(date -u +%FT%TZ)"

# With --signal=B:USR1 or `scancel --full` the batch shell gets the signal too: it must not die of it.
# The training processes themselves checkpoint at the next step boundary and requeue the job.
trap 'echo "facegen: the batch shell got SIGUSR1; the training processes checkpoint and requeue the job"' USR1

# One launcher per node; it reads SLURM's variables and starts `accelerate launch` there.
# (srun of SLURM 22.05 does not inherit --cpus-per-task from sbatch: pass it on.)
facegen_srun() {
    srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
        python -m facegen_dist.cli launch -- "$@"
}
