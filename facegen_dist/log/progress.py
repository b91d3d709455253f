"""Progress bars that suit where stderr goes: tqdm's bar on a terminal, a plain line every 30 s in a log file."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_FILE_INTERVAL_S = 30.0


class _Lines(tqdm):
    """tqdm writing whole lines instead of \r updates, so a SLURM or nohup log stays one line per report."""

    def display(self, msg=None, pos=None):
        text = (self.__str__() if msg is None else msg).strip()
        if text:
            self.fp.write(text + "\n")
            self.fp.flush()
        return True


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on a terminal; elsewhere the same figures as a line every 30 s (and at the end)."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return _Lines(iterable, **{**kwargs, "mininterval": LOG_FILE_INTERVAL_S, "leave": True})
