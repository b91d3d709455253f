"""The training stream: sharded, shuffled, endless, equal-length per rank, resumable in O(shard).

A pure function of (seed, slot, position), built from webdataset's shard reading (see `shards.py`) instead of
`wds.WebDataset(..., resampled=True)` + a shuffle buffer. Design notes (why, slots, shuffle groups, exact
resume, unreadable samples): docs/data.md.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facegen_dist.data.codecs import decode_image, decode_npy
from facegen_dist.data.shards import ShardInfo, ShardReadError, image_extension, iter_shard_samples, read_shard
from facegen_dist.errors import DataError


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[ShardInfo, ...]
    resolution: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    start_batch: int = 0  # batches this rank has already consumed since `sequence_offset`
    # Where in the endless shard sequence this layout of slots begins (> 0 after a resume on another
    # world size, worker count, batch or shuffle group: see `continue_after`).
    sequence_offset: int = 0
    shuffle_group: int = 4
    hflip: bool = True
    # (name, vocabulary) pairs: when given, batches carry "labels" int64 [B, A] (value index, -1 if absent).
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Code shards (data/codes.py): batches carry "codes" {level: int64 [B, h, w]} instead of "image", never flipped.
    code_levels: tuple[str, ...] = ()


class ShardSchedule:
    """Which shards slot `slot` of `num_slots` reads, group by group."""

    def __init__(
        self, shard_counts: list[int], seed: int, slot: int, num_slots: int, shuffle_group: int, offset: int = 0
    ):
        self.shard_counts = shard_counts
        self.seed, self.slot, self.num_slots, self.shuffle_group, self.offset = (
            seed,
            slot,
            num_slots,
            shuffle_group,
            offset,
        )

    @lru_cache(maxsize=8)
    def _pass_order(self, pass_index: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0x5A4D, pass_index]).permutation(len(self.shard_counts))

    def _shard_at(self, sequence_index: int) -> int:
        pass_index, within = divmod(sequence_index, len(self.shard_counts))
        return int(self._pass_order(pass_index)[within])

    def sequence_indices(self, group_index: int) -> list[int]:
        """Positions in the endless shard sequence of the group's shards."""
        first = group_index * self.shuffle_group
        return [self.offset + (first + j) * self.num_slots + self.slot for j in range(self.shuffle_group)]

    def group(self, group_index: int) -> list[int]:
        return [self._shard_at(index) for index in self.sequence_indices(group_index)]

    def group_size(self, group_index: int) -> int:
        return sum(self.shard_counts[s] for s in self.group(group_index))

    def locate(self, position: int) -> tuple[int, int]:
        """(group, offset in group) of the slot's `position`-th sample."""
        group_index = 0
        while True:
            size = self.group_size(group_index)
            if position < size:
                return group_index, position
            position -= size
            group_index += 1


def slot_positions(spec: StreamSpec) -> list[tuple[int, int]]:
    """(slot, samples it has delivered) for every slot of `spec`'s layout after each rank consumed `spec.start_batch` batches."""
    workers = max(1, spec.num_workers)
    return [
        (rank * workers + logical, _batches_done(spec.start_batch, logical, workers) * spec.batch_size)
        for rank in range(spec.world_size)
        for logical in range(workers)
    ]


def _batches_done(start_batch: int, logical: int, workers: int) -> int:
    """Batches logical slot `logical` of `workers` has produced once its rank consumed `start_batch` (round-robin)."""
    return (start_batch - logical + workers - 1) // workers if start_batch > logical else 0


def continue_after(old: StreamSpec) -> tuple[int, int]:
    """Where a new slot layout continues a stream read by `old`'s layout: (sequence offset, images skipped).

    The new layout starts at the first shard position that no old slot had begun, so nothing read
    is read again; the unread rest of the shards in flight (their groups were partly delivered, or
    a slot had not reached them) is skipped, and counted here.
    """
    counts = [s.num_samples for s in old.shards]
    num_slots = old.world_size * max(1, old.num_workers)
    begun_until, delivered = old.sequence_offset, 0
    for slot, position in slot_positions(old):
        schedule = ShardSchedule(counts, old.seed, slot, num_slots, old.shuffle_group, old.sequence_offset)
        group_index, offset = schedule.locate(position)
        last_begun = group_index if offset > 0 else group_index - 1
        if last_begun >= 0:
            begun_until = max(begun_until, schedule.sequence_indices(last_begun)[-1] + 1)
        delivered += position
    spanned = sum(
        counts[ShardSchedule(counts, old.seed, 0, 1, 1)._shard_at(i)] for i in range(old.sequence_offset, begun_until)
    )
    return begun_until, spanned - delivered


def attribute_labels(values: dict, attributes: tuple[tuple[str, tuple[str, ...]], ...]) -> np.ndarray:
    """Indices of each attribute's value in its vocabulary; -1 where the sample lacks it or it does not apply."""
    from facegen_dist.data.avatars import applicable_attributes

    applicable = applicable_attributes(values)
    labels = np.full(len(attributes), -1, dtype=np.int64)
    for index, (name, vocabulary) in enumerate(attributes):
        if name in applicable and values.get(name) in vocabulary:
            labels[index] = vocabulary.index(values[name])
    return labels


class ShardStream(IterableDataset):
    """Endless stream of {"image": uint8 [B,3,H,W] (or "codes"), "bad_samples": int[, "labels": int64 [B,A]]} batches for one rank."""

    def __init__(self, spec: StreamSpec):
        if not spec.shards:
            raise DataError("no shards to read")
        self.spec = spec

    def _worker_index(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def _worker_plan(self) -> tuple[int, int, int]:
        """(slot, number of slots, first position) for the current DataLoader worker."""
        spec = self.spec
        worker = self._worker_index()
        workers = max(1, spec.num_workers)
        logical = (worker + spec.start_batch) % workers
        done = _batches_done(spec.start_batch, logical, workers)
        # After `start_batch` batches, logical slot L has produced `done` batches (contiguous in
        # its own stream). Request 0 of the new loader goes to worker 0, which plays B % W.
        return spec.rank * workers + logical, spec.world_size * workers, done * spec.batch_size

    def __iter__(self):
        spec = self.spec
        slot, num_slots, position = self._worker_plan()
        schedule = ShardSchedule(
            [s.num_samples for s in spec.shards], spec.seed, slot, num_slots, spec.shuffle_group, spec.sequence_offset
        )
        samples = self._samples(schedule, slot, position)
        while True:
            images, labels, bad = [], [], 0
            for _ in range(spec.batch_size):
                image, label, replaced = next(samples)
                images.append(image)
                labels.append(label)
                bad += replaced
            if spec.code_levels:
                batch = {
                    "codes": {
                        level: torch.from_numpy(np.stack([item[level] for item in images]))
                        for level in spec.code_levels
                    },
                    "bad_samples": bad,
                }
            else:
                batch = {
                    "image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                    "bad_samples": bad,
                }
            if spec.attributes:
                batch["labels"] = torch.from_numpy(np.stack(labels))
            yield batch

    def _load_group(self, schedule: ShardSchedule, group_index: int) -> list[list[dict]]:
        loaded = []
        for shard_index in schedule.group(group_index):
            shard = self.spec.shards[shard_index]
            samples, problem = read_shard(shard.path)
            if problem or len(samples) != shard.num_samples:
                # Positions come from the manifest's counts: a shorter shard's missing samples are replaced, a longer one's extra unread.
                effect = (
                    f"{shard.num_samples - len(samples)} images of this pass replaced by others"
                    if len(samples) < shard.num_samples
                    else f"{len(samples) - shard.num_samples} images never read"
                )
                print(
                    f"facegen: warning: {problem or shard.path}: {len(samples)} samples read, the manifest says {shard.num_samples}: "
                    f"{effect}; run `facegen data verify`",
                    file=sys.stderr,
                    flush=True,
                )
            loaded.append(samples)
        return loaded

    def _decode_item(self, sample: dict) -> np.ndarray | dict[str, np.ndarray] | None:
        if self.spec.code_levels:
            return {level: decode_npy(sample[f"{level}.npy"]).astype(np.int64) for level in self.spec.code_levels}
        extension = image_extension(sample)
        return decode_image(sample[extension], self.spec.resolution) if extension is not None else None

    def _decode(self, sample: dict | None) -> tuple[np.ndarray | dict, np.ndarray | None] | None:
        if sample is None:
            return None
        try:
            image = self._decode_item(sample)
            if image is None:
                self._report_bad(sample, "no image in the sample")
                return None
            labels = (
                attribute_labels(json.loads(sample["json"]) if "json" in sample else {}, self.spec.attributes)
                if self.spec.attributes
                else None
            )
        except Exception as error:  # noqa: BLE001 — PIL raises many types for damaged images, json for damaged labels
            self._report_bad(sample, f"{type(error).__name__}: {str(error)[:120]}")
            return None
        return image, labels

    def _report_bad(self, sample: dict, reason: str) -> None:
        """One line per bad sample (key, shard, reason), the first time this process meets it."""
        key = (sample.get("__url__", "?"), sample.get("__key__", "?"))
        reported = self.__dict__.setdefault("_reported", set())
        if key not in reported:
            reported.add(key)
            print(
                f"facegen: warning: bad sample {key[1]} in {key[0]} ({reason}); replaced by another sample of its shuffle block",
                file=sys.stderr,
                flush=True,
            )

    def _samples(self, schedule: ShardSchedule, slot: int, position: int):
        """Yields (HWC uint8 image or codes, labels or None, 1 if it stands in for a bad sample else 0), endlessly."""
        spec = self.spec
        group_index, offset = schedule.locate(position)
        while True:
            loaded = self._load_group(schedule, group_index)
            counts = [spec.shards[s].num_samples for s in schedule.group(group_index)]
            nominal = [(j, i) for j, count in enumerate(counts) for i in range(count)]
            rng = np.random.default_rng([spec.seed, 0xF1A9, slot, group_index])
            order = rng.permutation(len(nominal))
            flips = rng.random(len(nominal)) < 0.5

            def at(index: int) -> tuple[np.ndarray, np.ndarray | None] | None:
                j, i = nominal[order[index]]
                return self._decode(loaded[j][i] if i < len(loaded[j]) else None)

            for index in range(offset, len(nominal)):
                decoded, replaced = at(index), 0
                if decoded is None:
                    replaced = 1
                    decoded = next(
                        (d for k in range(1, len(nominal)) if (d := at((index + k) % len(nominal))) is not None), None
                    )
                    if decoded is None:
                        raise DataError(
                            f"no readable sample in shards {[spec.shards[s].path for s in schedule.group(group_index)]}"
                        )
                image, labels = decoded
                # a flipped code grid is not the flipped image's
                if spec.hflip and flips[index] and not spec.code_levels:
                    image = image[:, ::-1]
                yield image, labels, replaced
            group_index, offset = group_index + 1, 0


def _ignore_scheduler_signals(worker_id: int) -> None:
    """Workers leave SLURM's signals to the training process, which decides when to stop.

    SLURM signals every process of a job, and a worker dying of SIGUSR1/USR2 (or of the SIGTERM
    submitit's preemption sends before its USR2) would make the DataLoader raise in the middle of
    the step the training process finishes for its checkpoint. USR1/USR2 are ignored. SIGTERM is
    ignored only while the loader runs: at shutdown the DataLoader sets its done event and then
    terminates workers that are still there, and that SIGTERM must end them (or the training
    process waits for them forever at exit).
    """
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    # torch calls worker_init_fn from _worker_loop, whose `done_event` is the loader's shutdown flag.
    done_event = sys._getframe(1).f_locals.get("done_event")
    if done_event is not None:
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0) if done_event.is_set() else None)


def make_train_loader(spec: StreamSpec, pin_memory: bool = False) -> DataLoader:
    workers = spec.num_workers
    return DataLoader(
        ShardStream(spec),
        batch_size=None,  # batches are assembled in the stream
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_scheduler_signals,
        # Its own generator: iter() draws a base seed, and from the global RNG that draw would shift
        # the training noise of a resumed run (the checkpoint's RNG state already holds the first one).
        generator=torch.Generator().manual_seed(spec.seed),
    )


def read_images(shards: list[ShardInfo], num: int, resolution: int) -> tuple[torch.Tensor, list[dict]]:
    """The first `num` decodable images of `shards` in order (uint8 [N,3,H,W]) and their JSON attributes."""
    import json

    images, attributes = [], []
    for shard in shards:
        try:
            for sample in iter_shard_samples(shard.path):
                extension = image_extension(sample)
                if extension is None:
                    continue
                try:
                    images.append(decode_image(sample[extension], resolution))
                except Exception:  # noqa: BLE001
                    continue
                try:
                    attributes.append(json.loads(sample["json"]) if "json" in sample else {})
                except (ValueError, UnicodeDecodeError):
                    print(
                        f"facegen: warning: {shard.path}: sample {sample['__key__']} has unreadable JSON attributes; read as none",
                        file=sys.stderr,
                    )
                    attributes.append({})
                if len(images) == num:
                    break
        except ShardReadError as error:
            print(f"facegen: warning: {error}", file=sys.stderr)
        if len(images) == num:
            break
    if not images:
        raise DataError(f"no readable images in {len(shards)} shard(s)")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), attributes


def iter_split_chunks(shards: list[ShardInfo], num: int, batch_size: int, chunks: list[int], resolution: int):
    """One pass over a split yielding (chunk, uint8 images) for the wanted chunks of its first `num` images.

    Chunk c holds images c*batch_size ... ; only images in wanted chunks are decoded.
    """
    wanted = set(chunks)
    pending: list[np.ndarray] = []
    index = 0
    for shard in shards:
        for sample in iter_shard_samples(shard.path):
            extension = image_extension(sample)
            if extension is None:
                continue
            chunk = index // batch_size
            if chunk in wanted:
                try:
                    pending.append(decode_image(sample[extension], resolution))
                except Exception as error:  # noqa: BLE001
                    raise DataError(
                        f"{shard.path}: sample {sample['__key__']} is not a readable image ({error}); run `facegen data verify`"
                    ) from None
            index += 1
            last_of_chunk = index % batch_size == 0 or index == num
            if last_of_chunk and chunk in wanted:
                yield chunk, torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).contiguous()
                pending = []
            if index == num:
                return
    if index < num:
        raise DataError(f"split has {index} images, fewer than the {num} asked for")


def count_split_images(shards: list[ShardInfo]) -> int:
    return sum(shard.num_samples for shard in shards)
