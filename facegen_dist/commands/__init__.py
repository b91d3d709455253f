"""The `facegen` commands, one module each: HELP (one line), build_parser(subparsers) and run(args) -> int.

A command module imports only the standard library and facegen_dist.errors at its top: the CLI builds
every command's parser for its help. Library imports go inside run(), so `facegen data` loads no torch.
"""

from __future__ import annotations

import os

# The order of `facegen --help`: training and launching first, then data, evaluation and analysis.
NAMES = (
    "train",
    "submit",
    "launch",
    "data",
    "codes",
    "eval",
    "sample",
    "export",
    "extractor",
    "latent",
    "report",
    "suite",
)


def is_main_rank() -> bool:
    """Rank 0 of the job, read from the launcher's variables (there may be no process group yet, or none left)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
