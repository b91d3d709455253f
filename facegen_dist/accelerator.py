"""The one way this project builds an Accelerator: with a collective timeout long enough for slow first steps."""

from __future__ import annotations

from datetime import timedelta

from accelerate import Accelerator, InitProcessGroupKwargs

# Long: the first process of a node may render the embedded set or compute a reference while the others wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def make_accelerator(backend: str | None = None, **kwargs) -> Accelerator:
    """`Accelerator(**kwargs)` whose process group waits COLLECTIVE_TIMEOUT (and uses `backend`, if given)."""
    group = InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT, **({"backend": backend} if backend else {}))
    return Accelerator(kwargs_handlers=[group], **kwargs)
