#!/usr/bin/env python
"""Submit a training run to SLURM with submitit: the same as `facegen submit` (see facegen_dist/commands/submit.py).

python launch/submit.py --config configs/vqgan_ffhq512.yaml --nodes 2 --gpus-per-node 4 --time 4:00:00 --partition gpu
python launch/submit.py --config configs/vae_avatars64.yaml --local --cpu --tasks-per-node 2
"""

import sys

from facegen_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
