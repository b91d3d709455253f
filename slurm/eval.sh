#!/bin/bash
# FID/KID/precision-recall (or rFID/PSNR/SSIM) of a trained run, samples sharded over every GPU.
#   RUN=runs/vqgan_ffhq512 sbatch slurm/eval.sh [--metrics fid,kid,prc] [--num 50000] [overrides]
# Writes RUN/eval/*.json (with the protocol). Short and not resumable: no requeue.
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=4:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
source "${FACEGEN_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
if [ -z "${RUN:-}" ]; then
    echo "facegen: error: set RUN to the run folder, e.g. RUN=runs/vqgan_ffhq512 sbatch slurm/eval.sh" >&2
    exit 2
fi
facegen_srun eval --run "$RUN" "$@"
