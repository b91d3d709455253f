"""Entry point for `accelerate launch train.py [--config FILE] [key=value ...]`: the same as `facegen train`."""

import sys

from facegen_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
