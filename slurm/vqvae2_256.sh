#!/bin/bash
# VQ-VAE2 on 256 px avatars (configs/vqvae2_avatars256.yaml; CONFIG=configs/vqvae2_ffhq512.yaml for FFHQ).
#   sbatch slurm/vqvae2_256.sh [key=value overrides...]
#SBATCH --job-name=vqvae2_256
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1       # keep 1: the launcher starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
source "${FACEGEN_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
facegen_srun train --config "${CONFIG:-configs/vqvae2_avatars256.yaml}" "$@"
