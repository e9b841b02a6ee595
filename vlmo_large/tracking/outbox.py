"""A bounded, thread-safe queue of logging operations between the training loop and the sender.

The loop only appends (never waits on the network). When the sender cannot deliver, operations go
back to the front and wait; metric records beyond `max_metrics` are DROPPED OLDEST FIRST, so a long
outage costs the oldest buffered points, never memory or time. Params, tags, artifacts and the
final status are few and are always kept.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

METRICS_PER_REQUEST = 1000  # mlflow's MAX_METRICS_PER_BATCH


@dataclass(eq=False)  # identity: two equal ops are still two ops
class Op:
    kind: str  # "metrics" | "params" | "tags" | "artifact" | "finish"
    payload: Any = None

    @property
    def size(self) -> int:
        return len(self.payload) if self.kind == "metrics" else 0


class Outbox:
    def __init__(self, max_metrics: int = 100_000):
        self.max_metrics = max_metrics
        self._ops: deque[Op] = deque()
        self._metrics = 0
        self.dropped_metrics = 0
        self._taken: Op | None = None  # taken and not yet settled: flush() must wait for it too
        self._cond = threading.Condition()

    def put(self, op: Op) -> None:
        with self._cond:
            self._ops.append(op)
            self._metrics += op.size
            self._enforce_bound()
            self._cond.notify()

    def settle(self) -> None:
        """The taken op was delivered or dropped."""
        with self._cond:
            self._taken = None

    def requeue(self, ops: list[Op]) -> None:
        """Give undelivered operations back, ahead of everything newer."""
        with self._cond:
            self._taken = None
            for op in reversed(ops):
                self._ops.appendleft(op)
                self._metrics += op.size
            self._enforce_bound()

    def take(self, timeout: float) -> Op | None:
        """The next request's worth: one non-metric op, or consecutive metric ops merged up to the
        per-request limit. Waits up to `timeout` for something to arrive; None if nothing did.
        The caller then calls `settle()` or `requeue()`."""
        with self._cond:
            if not self._ops:
                self._cond.wait(timeout)
            if not self._ops:
                return None
            first = self._ops.popleft()
            self._metrics -= first.size
            if first.kind == "metrics":
                merged = list(first.payload)
                while self._ops and self._ops[0].kind == "metrics" \
                        and len(merged) + self._ops[0].size <= METRICS_PER_REQUEST:
                    nxt = self._ops.popleft()
                    self._metrics -= nxt.size
                    merged.extend(nxt.payload)
                first = Op("metrics", merged)
            self._taken = first
            return first

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def pending_metrics(self) -> int:
        with self._cond:
            return self._metrics

    def __len__(self) -> int:
        with self._cond:
            return len(self._ops)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._ops and self._taken is None

    def undelivered(self) -> tuple[dict[str, int], dict[str, int]]:
        """(queued, in flight): records by kind ("metric points", "params", "tags", "artifacts")
        still queued, and those in a request sent but not answered."""
        with self._cond:
            return _count(self._ops), _count([self._taken] if self._taken else [])

    def _enforce_bound(self) -> None:
        # Drop whole records from the oldest metric op until within bound (caller holds the lock).
        while self._metrics > self.max_metrics:
            oldest = next(op for op in self._ops if op.kind == "metrics")
            excess = self._metrics - self.max_metrics
            cut = min(excess, oldest.size)
            oldest.payload = oldest.payload[cut:]
            self._metrics -= cut
            self.dropped_metrics += cut
            if not oldest.payload:
                self._ops.remove(oldest)


_NAMES = {"metrics": "metric points", "params": "params", "tags": "tags", "artifact": "artifacts"}


def _count(ops) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        if op.kind not in _NAMES:  # "finish": reported as the run's status not recorded
            continue
        name = _NAMES[op.kind]
        counts[name] = counts.get(name, 0) + (len(op.payload) if op.kind in ("metrics", "params", "tags") else 1)
    return counts
