#!/bin/bash
# Stage 2: the code prior of a trained VQ run (GPT for VQ-GAN, PixelCNNs for VQ-VAE2).
#   sbatch slurm/prior.sh                                               # GPT on runs/vqgan_ffhq512
#   CONFIG=configs/prior_vqvae2_avatars256.yaml sbatch slurm/prior.sh    # PixelCNN priors
# The prior config's model.vq_run names the frozen VQ run; its codes are computed per batch.
#SBATCH --job-name=prior
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
facegen_srun train --config "${CONFIG:-configs/prior_vqgan_ffhq512.yaml}" "$@"
