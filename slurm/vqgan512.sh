#!/bin/bash
# The headline job: VQ-GAN at 512x512 on FFHQ (configs/vqgan_ffhq512.yaml: bf16, activation
# checkpointing, 8 images per GPU per step as 4 micro-batches of 2: ~3.5 GB per GPU plus recompute transients by the CPU estimate
# of benchmarks/memory.py, not yet measured on a GPU) on N nodes x G GPUs.
#   1. shards once:  facegen data ffhq --src /datasets/ffhq --out data/ffhq512 --size 512
#   2. submit:       sbatch --nodes=2 --gpus-per-node=4 --partition=gpu slurm/vqgan512.sh
# Overrides after the script name: sbatch slurm/vqgan512.sh train.total_images=2000000
# Time limits and preemption: USR1 3 min before the end -> checkpoint -> requeue -> resume.
#SBATCH --job-name=vqgan512
#SBATCH --nodes=2                 # any number of nodes works, 1 included
#SBATCH --ntasks-per-node=1       # keep 1: the launcher starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32        # 4 processes x (1 + data workers)
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180         # a 512 px checkpoint takes longer: 3 min lead
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
source "${FACEGEN_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
facegen_srun train --config "${CONFIG:-configs/vqgan_ffhq512.yaml}" "$@"
