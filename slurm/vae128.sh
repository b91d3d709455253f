#!/bin/bash
# VAE on 128 px avatars (configs/vae_avatars128.yaml). Submit from the checkout:
#   sbatch slurm/vae128.sh [key=value overrides...]
#   sbatch --nodes=1 --gpus-per-node=2 slurm/vae128.sh train.total_images=500000
# Preempted or near its time limit, it checkpoints, requeues itself and continues.
#SBATCH --job-name=vae128
#SBATCH --nodes=1                 # any number of nodes works, 1 included
#SBATCH --ntasks-per-node=1       # keep 1: the launcher starts one process per GPU
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8         # data workers + the training processes of the node
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120         # 2 min before the time limit: checkpoint, then requeue
#SBATCH --requeue
#SBATCH --open-mode=append        # a requeued job appends to the same log
#SBATCH --output=%x-%j.out
# Add your cluster's --partition/--account lines here (or pass them to sbatch).
source "${FACEGEN_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
facegen_srun train --config "${CONFIG:-configs/vae_avatars128.yaml}" "$@"
