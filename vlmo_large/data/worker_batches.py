"""Whole batches, made inside a loader worker from its own sample stream (sample_stream.py).

A worker cuts its samples into batches of `batch_size` in stream order and collates each one
itself, so a batch crosses to the main process as one item: the DataLoader's prefetch_factor
then counts batches, and the main process only hands them on (and pins them). The samples a
worker has left at its end (fewer than a batch) travel uncollated as its `tail` with its end
marker; the loader joins the tails of all workers into the epoch's last batches (loader.py).

Items: {"w", "batch", "pos", "events", "completed"} for a batch, where pos/events/completed are
the sample stream's bookkeeping per sample of the batch (what the loader commits when it yields
the batch), and {"w", "end": True, "tail", "pos", "events", "completed", "end_pos",
"end_events", "end_completed"} at a worker's end ("end_*": the records after its last sample).
Placeholders pass through unchanged.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from torch.utils.data import IterableDataset

from vlmo_large.data.sample_processing import collate
from vlmo_large.data.sample_stream import SampleStream


def _bookkeeping(group: list[dict]) -> dict:
    return {"pos": [g["pos"] for g in group], "events": [g["events"] for g in group],
            "completed": [g["completed"] for g in group]}


def batch_items(items: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """The sample items of one worker's stream -> its batch items (see module doc)."""
    group: list[dict] = []
    for item in items:
        if item.get("placeholder"):
            yield item
        elif item.get("end"):
            yield {"w": item["w"], "end": True, "tail": [g["sample"] for g in group], **_bookkeeping(group),
                   "end_pos": item["pos"], "end_events": item["events"], "end_completed": item["completed"]}
            return
        else:
            group.append(item)
            if len(group) == batch_size:
                yield {"w": item["w"], "batch": collate([g["sample"] for g in group]), **_bookkeeping(group)}
                group = []


class WorkerBatches(IterableDataset):
    """The DataLoader's dataset: in each worker, that worker's batch items."""

    def __init__(self, stream: SampleStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[dict]:
        return batch_items(iter(self.stream), self.batch_size)
