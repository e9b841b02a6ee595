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
        self._in_flight = False  # an op taken and not yet settled: flush() must wait for it too
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
            self._in_flight = False

    def requeue(self, ops: list[Op]) -> None:
        """Give undelivered operations back, ahead of everything newer."""
        with self._cond:
            self._in_flight = False
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
            self._in_flight = True
            first = self._ops.popleft()
            self._metrics -= first.size
            if first.kind != "metrics":
                return first
            merged = list(first.payload)
            while self._ops and self._ops[0].kind == "metrics" \
                    and len(merged) + self._ops[0].size <= METRICS_PER_REQUEST:
                nxt = self._ops.popleft()
                self._metrics -= nxt.size
                merged.extend(nxt.payload)
            return Op("metrics", merged)

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
            return not self._ops and not self._in_flight

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
