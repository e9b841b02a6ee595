"""The per-worker sample stream: which shards a (rank, worker) reads in an epoch, in what order,
and where a resumed worker picks up.

Deterministic by construction:
- epoch order: a permutation of all shards seeded by (seed, epoch) (identity when not training);
- assignment: global worker g = rank * num_workers + worker takes order[g::ranks*workers];
- sample order: the worker's shards read in turn through a shuffle buffer whose generator is
  seeded by (seed, epoch, rank, worker).
The buffer holds raw records, so a resumed worker replays reading and shuffling of the records it
already delivered (cheap: no decoding) and continues with exactly the next one.

Each yielded item is a small dict `{"w", "pos", "events", "completed", "sample", "end",
"placeholder"}`: `pos` counts raw records taken from the buffer (good or bad), `events` counts the
skipped/converted records and shard problems since the previous item, `completed` names shards all
of whose records have now been taken. The loader turns these into its resumable state.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Iterator, Sequence

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle

from vlmo_large.data.decoding import SkipSample
from vlmo_large.data.sample_processing import SampleProcessor, stable_hash
from vlmo_large.data.tar_reader import DEFAULT_TIMEOUT_S, read_shards


def epoch_shard_order(shards: Sequence[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    order = list(shards)
    if shuffle:
        random.Random(stable_hash("shards", seed, epoch)).shuffle(order)
    return order


class SampleStream(IterableDataset):
    def __init__(self, shards: Sequence[str], processor: SampleProcessor, *, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle: bool, shuffle_buffer: int = 1000,
                 shard_timeout: float = DEFAULT_TIMEOUT_S):
        self.shards = list(shards)
        self.processor = processor
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.shard_timeout = shard_timeout
        # set by the loader before every pass
        self.epoch = 0
        self.epoch_shards: list[str] | None = None  # explicit remaining shards after a re-layout
        self.resume: dict[int, dict] = {}  # worker -> {"pos", "done", "placeholder"}

    def worker_shards(self, worker: int) -> list[str]:
        order = (self.epoch_shards if self.epoch_shards is not None
                 else epoch_shard_order(self.shards, self.seed, self.epoch, self.shuffle))
        g, total = self.rank * self.num_workers + worker, self.world_size * self.num_workers
        return order[g::total]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        resume = self.resume.get(worker, {})
        if resume.get("done"):
            return
        if resume.get("placeholder"):
            # keeps the DataLoader's worker round-robin aligned with the interrupted run
            yield {"w": worker, "placeholder": True}
        yield from self._items(worker, self.worker_shards(worker), skip=resume.get("pos", 0))

    def _items(self, worker: int, paths: list[str], skip: int) -> Iterator[dict]:
        events, completed = Counter(), []  # shard-level news not yet attached to a record
        read_count, taken, read_done = Counter(), Counter(), set()

        def shard_end(pos: int) -> None:
            read_done.add(pos)
            if taken[pos] == read_count[pos]:
                completed.append(paths[pos])

        def records():
            for pos, record in read_shards(paths, on_event=lambda r: events.update([r]),
                                           on_shard_end=shard_end, timeout=self.shard_timeout):
                read_count[pos] += 1
                record["__shard__"] = pos
                record["__events__"], record["__completed__"] = Counter(events), list(completed)
                events.clear()
                completed.clear()
                yield record

        stream = records()
        if self.shuffle:
            rng = random.Random(stable_hash("buffer", self.seed, self.epoch, self.rank, worker))
            stream = wds_shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        carry_events, carry_completed = Counter(), []
        taken_total = 0
        for record in stream:
            taken_total += 1
            shard = record["__shard__"]
            taken[shard] += 1
            carry_events.update(record["__events__"])
            carry_completed.extend(record["__completed__"])
            if shard in read_done and taken[shard] == read_count[shard]:
                carry_completed.append(paths[shard])
            if taken_total <= skip:  # delivered before the state was saved
                carry_events.clear()
                carry_completed.clear()
                continue
            notes: list[str] = []
            key = record["__key__"]
            try:
                sample = self.processor(record, stable_hash("sample", self.seed, self.epoch, key), notes)
            except SkipSample as skipped:
                carry_events[skipped.reason] += 1
                continue
            carry_events.update(notes)
            sample["key"], sample["index"] = key, stable_hash("index", key)
            yield {"w": worker, "pos": taken_total, "events": dict(carry_events),
                   "completed": carry_completed, "sample": sample}
            carry_events, carry_completed = Counter(), []
        carry_events.update(events)
        carry_completed.extend(completed)
        yield {"w": worker, "pos": taken_total, "events": dict(carry_events),
               "completed": carry_completed, "sample": None, "end": True}

