"""The training data loader: batches from webdataset shards, resumable mid-epoch.

    loader = build_loader("image_text", "data/cc/{000000..000999}.tar", 256, tokenizer=tok,
                          image_size=224, max_text_len=40, num_workers=8)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)          # keeps a restored position if it is this epoch
        for batch in loader: ...
    ckpt["data"] = loader.state_dict()   # JSON-serialisable; loader.load_state_dict(...) restores

Order. Workers (torch DataLoader processes, or one in-process stream when num_workers=0) each
read their own samples and cut them into batches of `batch_size` in their stream order, collated
in the worker (worker_batches); the DataLoader takes the batches round-robin, skipping finished
workers, so its prefetch_factor counts batches. The samples a worker has left at its end (fewer
than a batch) are its tail: once every worker has ended, the tails are joined in worker order
and cut into the epoch's last batches (the last partial one dropped under drop_last). Every
sample and its augmentation is a pure function of (seed, epoch, rank, worker layout, shard
list), see sample_stream. With 0 or 1 workers a batch is the next `batch_size` samples of the
one stream; with more, each batch comes from one worker (samples are not interleaved across
workers within a batch: that would need each worker to know the others' progress).

Pixels. pixels="float" (default) yields normalised float32 images; pixels="uint8" yields the raw
uint8 pixels, normalised on the device by device_batch.to_device (a quarter of the bytes to
move and pin). pin_memory=True (CUDA only) yields batches in page-locked memory.

State. Per worker: how many raw records it has delivered into yielded batches (`pos`; a tail
waiting for the other workers' tails is not delivered yet), whether it is finished, and which
shards it has completely delivered; plus the epoch, the worker whose turn
is next, the skip counts, and the shard order of the epoch if it was re-laid-out (below).
Samples of a batch cut off by drop_last at the end of an epoch count as delivered. When an epoch
has been iterated to its end, the state moves to the next epoch at position 0.

Restore:
- Same layout (world_size, num_workers; each rank loads the state it saved): exact. The stream
  continues with exactly the samples, augmentations and masks an uninterrupted run would have
  produced next; nothing of the epoch repeats or goes missing.
- Changed layout (other world size or worker count): pass the states of ALL old ranks merged
  with `merge_loader_states`. The epoch continues at shard granularity: shards every old worker
  had completely delivered are not read again; the remaining shards of the epoch (in the epoch's
  order) are dealt round-robin to the new workers and read from their start, so samples of shards
  that were partly delivered at save time are seen a second time. Later epochs are exact again.
- A single rank's state for a changed layout is refused (the other ranks' progress is unknown).
- A state saved right after the last batch of an epoch continues, in the same iteration, with
  the next epoch's batches (the rest of the saved epoch is empty).
- Another kind, seed or shard list is refused with a one-line UserError naming what changed.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Sequence

import torch.distributed as dist
from torch.utils.data import DataLoader

from vlmo_large.data.decoding import CONVERTED
from vlmo_large.data.device_batch import pin_batch
from vlmo_large.data.sample_processing import SampleProcessor, collate
from vlmo_large.data.sample_stream import SampleStream, epoch_shard_order
from vlmo_large.data.shard_list import expand_shards
from vlmo_large.data.tar_reader import DEFAULT_TIMEOUT_S
from vlmo_large.data.vqa_targets import load_answers
from vlmo_large.data.worker_batches import WorkerBatches
from vlmo_large.errors import UserError

STATE_VERSION = 1


def _fingerprint(shards: Sequence[str]) -> str:
    return hashlib.sha1(json.dumps(list(shards)).encode()).hexdigest()[:16]


_WHAT_CHANGED = {"kind": "kind (stage)", "seed": "seed", "shards": "shard list (data.shards)"}


def _describe(state: dict, key: str) -> str:
    if key == "shards":
        count = state.get("num_shards")
        return f"{count} shards, fingerprint {state[key]}" if count is not None else f"fingerprint {state[key]}"
    return repr(state[key])


class StreamLoader:
    def __init__(self, stream: SampleStream, batch_size: int, *, num_workers: int = 0,
                 drop_last: bool = True, prefetch_factor: int = 2, epoch: int = 0, pin_memory: bool = False):
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.prefetch_factor = prefetch_factor  # batches per worker
        self.pin_memory = pin_memory
        self._reset_epoch(epoch)
        self._skips: Counter = Counter()

    # ----- epoch and position -------------------------------------------------------------
    def _reset_epoch(self, epoch: int, epoch_shards: list[str] | None = None) -> None:
        self.epoch = epoch
        self._epoch_shards = epoch_shards
        self._workers = {w: {"pos": 0, "done": False, "completed": []}
                         for w in range(self.stream.num_workers)}
        self._last_worker: int | None = None
        self._restored = False  # set by load_state_dict: the position may be the epoch's very end

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at its beginning, unless the loader already stands inside it (restored)."""
        if epoch != self.epoch:
            self._reset_epoch(epoch)

    def skip_counts(self) -> dict[str, int]:
        """Records and shards skipped, by reason, over all workers of this rank so far."""
        return {k: n for k, n in self._skips.items() if not k.startswith(CONVERTED)}

    def converted_counts(self) -> dict[str, int]:
        """Images converted to RGB and used (not skipped), by source mode: `converted_<mode>`."""
        return {k: n for k, n in self._skips.items() if k.startswith(CONVERTED)}

    def _next_worker(self) -> int | None:
        n = self.stream.num_workers
        start = 0 if self._last_worker is None else self._last_worker + 1
        for step in range(n):
            w = (start + step) % n
            if not self._workers[w]["done"]:
                return w
        return None

    # ----- iteration ----------------------------------------------------------------------
    def __iter__(self):
        # A state saved after the last batch of an epoch (the workers' end markers not yet seen)
        # has nothing left of that epoch: that pass is empty, and an uninterrupted run would go on
        # with the next epoch, so the same iteration does too (an empty FRESH epoch stays empty).
        inside = self._restored or self._last_worker is not None or any(
            s["pos"] or s["done"] for s in self._workers.values())
        yielded = False
        for batch in self._pass():
            yielded = True
            yield batch
        if inside and not yielded:
            yield from self._pass()

    def _pass(self):
        stream = self.stream
        stream.epoch, stream.epoch_shards = self.epoch, self._epoch_shards
        nxt = self._next_worker()
        stream.resume = {w: {"pos": s["pos"], "done": s["done"],
                             "placeholder": nxt is not None and w < nxt and self._last_worker is not None}
                         for w, s in self._workers.items()}
        source = WorkerBatches(stream, self.batch_size)
        if self.num_workers > 0:
            items = iter(DataLoader(source, batch_size=None, num_workers=self.num_workers,
                                    prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                    persistent_workers=False))
        else:
            items = iter(source)
        # `delivered`: the state as of the samples yielded so far; committed at every yield
        delivered = {w: dict(s, completed=list(s["completed"])) for w, s in self._workers.items()}
        skips: Counter = Counter()
        ends: dict[int, dict] = {}  # worker -> its end item, its tail not yet (fully) delivered

        def deliver(w: int, item: dict, count: int, start: int = 0) -> None:
            for k in range(start, start + count):
                delivered[w]["pos"] = item["pos"][k]
                delivered[w]["completed"].extend(item["completed"][k])
                skips.update(item["events"][k])

        def finish(w: int) -> None:
            end = ends.pop(w)
            delivered[w]["pos"] = end["end_pos"]
            delivered[w]["completed"].extend(end["end_completed"])
            delivered[w]["done"] = True
            skips.update(end["end_events"])

        def commit(last_worker) -> None:
            self._workers = {w: dict(s, completed=list(s["completed"])) for w, s in delivered.items()}
            self._skips.update(skips)
            skips.clear()
            self._last_worker = last_worker

        last_worker = self._last_worker
        for item in items:
            if item.get("placeholder"):
                continue
            w = last_worker = item["w"]
            if item.get("end"):
                ends[w] = item
                if not item["tail"]:
                    finish(w)
                continue
            deliver(w, item, len(item["pos"]))
            commit(w)
            yield pin_batch(item["batch"]) if self.pin_memory else item["batch"]
        yield from self._tail_batches(ends, deliver, finish, lambda: commit(last_worker))
        commit(last_worker)
        self._reset_epoch(self.epoch + 1)

    def _tail_batches(self, ends: dict, deliver, finish, commit):
        """Every worker has ended: their tails, joined in worker order, cut into batches."""
        tails = {w: ends[w]["tail"] for w in sorted(ends)}
        pieces = [(w, k) for w, tail in tails.items() for k in range(len(tail))]
        size = self.batch_size
        stop = len(pieces) // size * size if self.drop_last else len(pieces)
        for start in range(0, stop, size):
            # the epoch's last batch also delivers the samples drop_last cuts off
            through = len(pieces) if start + size >= stop else start + size
            for w, tail in tails.items():
                taken = [k for v, k in pieces[start:through] if v == w]
                if taken:
                    deliver(w, ends[w], len(taken), taken[0])
                    if taken[-1] == len(tail) - 1:
                        finish(w)
            commit()
            batch = collate([tails[w][k] for w, k in pieces[start:start + size]])
            yield pin_batch(batch) if self.pin_memory else batch
        for w in list(ends):  # too few for one batch under drop_last: cut off, counted as delivered
            deliver(w, ends[w], len(tails[w]))
            finish(w)

    # ----- checkpointing --------------------------------------------------------------------
    def _layout(self) -> dict:
        s = self.stream
        return {"world_size": s.world_size, "num_workers": s.num_workers}

    def state_dict(self) -> dict:
        s = self.stream
        return {"version": STATE_VERSION, "kind": s.processor.kind, "seed": s.seed, "epoch": self.epoch,
                "shards": _fingerprint(s.shards), "num_shards": len(s.shards), "epoch_shards": self._epoch_shards,
                **self._layout(), "last_worker": {str(s.rank): self._last_worker},
                "workers": {f"{s.rank}/{w}": dict(v, completed=list(v["completed"]))
                            for w, v in self._workers.items()},
                "skip_counts": dict(self._skips)}

    def load_state_dict(self, state: dict) -> None:
        s = self.stream
        if state.get("version") != STATE_VERSION:
            raise UserError(f"resume: the checkpoint's data state has version {state.get('version')!r}, "
                            f"this code reads version {STATE_VERSION}")
        now = {"kind": s.processor.kind, "seed": s.seed, "shards": _fingerprint(s.shards), "num_shards": len(s.shards)}
        for key in _WHAT_CHANGED:
            if state[key] != now[key]:
                raise UserError(f"resume: the data {_WHAT_CHANGED[key]} changed since the checkpoint "
                                f"({_describe(state, key)} then, {_describe(now, key)} now); resume with the "
                                "same data settings or start a new run with --init")
        mine = [f"{s.rank}/{w}" for w in range(s.num_workers)]
        if {k: state[k] for k in self._layout()} == self._layout() and all(k in state["workers"] for k in mine):
            self._reset_epoch(state["epoch"], state["epoch_shards"])
            self._workers = {w: dict(state["workers"][k], completed=list(state["workers"][k]["completed"]))
                             for w, k in enumerate(mine)}
            self._last_worker = state["last_worker"].get(str(s.rank))
            self._skips = Counter(state["skip_counts"])
            self._restored = True
            return
        old = [f"{r}/{w}" for r in range(state["world_size"]) for w in range(state["num_workers"])]
        if not all(k in state["workers"] for k in old):
            raise UserError("resume: the worker layout changed (world_size/num_workers) and this data state holds "
                            "only some ranks' progress; restore from merge_loader_states(all ranks' states)")
        done = {p for k in old for p in state["workers"][k]["completed"]}
        order = (state["epoch_shards"] if state["epoch_shards"] is not None
                 else epoch_shard_order(s.shards, s.seed, state["epoch"], s.shuffle))
        self._reset_epoch(state["epoch"], [p for p in order if p not in done])
        self._restored = True
        # every rank receives the merged counts; report them once, from rank 0
        self._skips = Counter(state["skip_counts"]) if s.rank == 0 else Counter()


def merge_loader_states(states: Sequence[dict]) -> dict:
    """Combine the states saved by every rank into one (needed to restore with another layout)."""
    merged = dict(states[0], workers={}, last_worker={}, skip_counts=Counter())
    for st in states:
        for key in ("kind", "seed", "shards", "epoch", "world_size", "num_workers"):
            if st[key] != merged[key]:
                raise UserError(f"resume: the ranks' data states disagree on {key} ({st[key]!r} != {merged[key]!r})")
        merged["workers"].update(st["workers"])
        merged["last_worker"].update(st["last_worker"])
        merged["skip_counts"].update(st["skip_counts"])
    merged["skip_counts"] = dict(merged["skip_counts"])
    return merged


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit data-parallel rank/size win; else torch.distributed's; else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank,
                dist.get_world_size() if world_size is None else world_size)
    return rank or 0, world_size or 1


def build_loader(kind: str, shards, batch_size: int, *, tokenizer=None, image_size: int = 224,
                 max_text_len: int = 40, train: bool = True, rank: int | None = None,
                 world_size: int | None = None, num_workers: int = 0, seed: int = 0, epoch: int = 0,
                 mlm_prob: float = 0.15, mim_ratio: float = 0.4, patch_size: int = 16,
                 drop_last: bool = True, shuffle_buffer: int = 1000, augment: str = "spec",
                 prefetch_factor: int = 2, shard_timeout: float = DEFAULT_TIMEOUT_S, pixels: str = "float",
                 pin_memory: bool = False, answers=None) -> StreamLoader:
    """A resumable loader of `kind` in {"image_text", "image", "text", "vqa", "nlvr2"} batches (see
    module doc; sample_processing lists each kind's fields).

    rank/world_size: the DATA-parallel rank and size (pass megatron's DP rank under tensor or
    pipeline parallelism); when omitted, torch.distributed's, else 0/1. `augment`: "spec",
    "light" or "none" (transforms.py); ignored when train=False. `shards`: local paths, patterns or
    URLs (shard_list); a shard that sends no byte for `shard_timeout` seconds is skipped and counted.
    `prefetch_factor`: batches each worker keeps ready. `pixels`: "float" (normalised) or "uint8"
    (normalise on the device: device_batch.to_device). `pin_memory`: page-locked batches (CUDA).
    `answers`: kind "vqa"'s answer vocabulary, a list of strings or the path of a JSON list
    (tools/make_shards.py vqa --answers); its order is the classifier's.
    """
    rank, world_size = _resolve_rank(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    processor = SampleProcessor(kind, tokenizer, image_size, max_text_len, train=train,
                                mlm_prob=mlm_prob, mim_ratio=mim_ratio, patch_size=patch_size,
                                augment=augment, pixels=pixels,
                                answers=load_answers(answers) if answers is not None else None)
    stream = SampleStream(expand_shards(shards), processor, rank=rank, world_size=world_size,
                          num_workers=num_workers, seed=seed, shuffle=train, shuffle_buffer=shuffle_buffer,
                          shard_timeout=shard_timeout)
    return StreamLoader(stream, batch_size, num_workers=num_workers, drop_last=drop_last,
                        prefetch_factor=prefetch_factor, epoch=epoch, pin_memory=pin_memory)
