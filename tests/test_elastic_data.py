"""What a resume on another data layout (world size, workers, batch, shuffle group) guarantees about the image stream."""

from __future__ import annotations

import hashlib

import pytest

from facegen_dist.data.pipeline import ShardSchedule, ShardStream, StreamSpec, continue_after
from facegen_dist.data.shards import split_shards


def _images(spec: StreamSpec, batches: int) -> list[str]:
    """Digests of the images one rank's stream delivers in its first `batches` batches (in process, workers played in turn)."""
    workers = max(1, spec.num_workers)
    streams = []
    for worker in range(workers):  # what DataLoader's round-robin over workers would deliver
        streams.append(iter(_WorkerStream(spec, worker)))
    digests = []
    for index in range(batches):
        batch = next(streams[index % workers])
        digests += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch["image"]]
    return digests


class _WorkerStream(ShardStream):
    def __init__(self, spec: StreamSpec, worker: int):
        super().__init__(spec)
        self.worker = worker

    def _worker_index(self) -> int:
        return self.worker


def _spec(shards, **kwargs) -> StreamSpec:
    return StreamSpec(tuple(shards), 32, seed=0, hflip=False, **{"batch_size": 8, "shuffle_group": 1, **kwargs})


@pytest.mark.parametrize(
    "before, after",
    [
        ({"world_size": 2, "num_workers": 1}, {"world_size": 1, "num_workers": 1}),
        ({"world_size": 1, "num_workers": 2}, {"world_size": 2, "num_workers": 1}),
        ({"world_size": 1, "num_workers": 1, "shuffle_group": 2}, {"world_size": 3, "num_workers": 1}),
        ({"world_size": 2, "num_workers": 1, "batch_size": 8}, {"world_size": 2, "num_workers": 1, "batch_size": 4}),
    ],
)
def test_a_new_layout_reads_nothing_again_and_skips_exactly_what_it_reports(tiny_shards, before, after):
    shards = split_shards(tiny_shards, "train")
    pass_size = sum(s.num_samples for s in shards)
    old = _spec(shards, start_batch=9, **before)
    read = [
        d
        for rank in range(old.world_size)
        for d in _images(_spec(shards, rank=rank, start_batch=0, **before), old.start_batch)
    ]
    offset, skipped = continue_after(old)
    assert 0 < skipped < pass_size and len(set(read)) == len(read) == old.world_size * old.start_batch * old.batch_size

    # One shard per group, one worker per new rank: new rank r reads the shards at positions offset + r, offset + r + S, ...
    # whole and in turn, so its first images up to the pass's end (position len(shards)) are the rest of this pass.
    counts, order = [s.num_samples for s in shards], ShardSchedule([s.num_samples for s in shards], 0, 0, 1, 1)
    world = after["world_size"]
    continued = []
    for rank in range(world):
        in_this_pass = sum(counts[order._shard_at(i)] for i in range(offset + rank, len(shards), world))
        batches = -(-in_this_pass // after.get("batch_size", 8)) if in_this_pass else 0
        continued += _images(_spec(shards, rank=rank, sequence_offset=offset, **after), batches)[:in_this_pass]
    assert not set(continued) & set(read), "an image read before the change was read again in the same pass"
    # the rest of the pass, each image once
    assert len(continued) == len(set(continued)) == pass_size - len(read) - skipped


def test_a_layout_that_read_nothing_moves_nothing(tiny_shards):
    shards = split_shards(tiny_shards, "train")
    spec = _spec(shards, world_size=2, num_workers=2, start_batch=0)
    assert continue_after(spec) == (0, 0)
