"""Shared fixtures: a tiny avatar shard set, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def one_intra_op_thread():
    """Tiny tensors: on a shared CPU a second intra-op thread makes them 10-100x slower, not faster. Restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """380 avatars at 32 px: 342 train samples in 7 shards (an odd count, the last one short), 38 val."""
    from facegen_dist.data.make_avatars import make_avatar_dataset

    out = tmp_path_factory.mktemp("shards") / "avatars32"
    make_avatar_dataset(out, num=380, size=32, seed=0, samples_per_shard=50, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_shards) -> Path:
    """A folder holding runs/tiny: the tiny VAE trained for 320 images on tiny_shards (EMA, 2 checkpoints)."""
    from helpers import TINY, run_train

    root = tmp_path_factory.mktemp("trained")
    result = run_train(
        root,
        *TINY,
        f"data.path={tiny_shards}",
        "run.name=tiny",
        "train.total_images=320",
        "train.ckpt_every_images=160",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def in_process_accelerator():
    """A one-process CPU accelerator in this pytest process: accelerate's singleton state, torch's thread count and
    the preemption signal handlers the Trainer sets are put back afterwards."""
    import signal

    import torch
    from accelerate.state import AcceleratorState

    from facegen_dist.cluster.preemption import PREEMPT_SIGNALS

    threads, handlers = torch.get_num_threads(), {s: signal.getsignal(s) for s in PREEMPT_SIGNALS}
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
