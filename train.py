"""Entry point for `accelerate launch train.py [--config FILE] [key=value ...]`."""

import sys

from facegen_dist.cli import exit_process, train_main

if __name__ == "__main__":
    sys.exit(exit_process(train_main(sys.argv[1:])))
