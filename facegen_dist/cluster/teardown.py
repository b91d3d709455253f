"""Ending a process that took part in a gloo process group."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def end_without_teardown(code: int = 0) -> NoReturn:
    """End this process now with `code`, skipping the interpreter's teardown.

    gloo's worker threads can still be releasing the last collective's tensors when the interpreter
    finalizes; a thread that then asks for the GIL is ended inside a C++ frame, and the whole process
    aborts ("terminate called without an active exception", SIGABRT) after its work finished well,
    with or without destroy_process_group. Call it once every file is closed and the process group
    destroyed: skipping the teardown then loses nothing but atexit hooks.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
