"""Stop requests: SIGTERM and SIGUSR1 (a Slurm time limit or preemption, torchrun or DeepSpeed's
launcher shutting down) ask the run to checkpoint at the next step boundary and exit cleanly.

    preemption.install()        # in the launcher, before anything heavy
    ...
    if preemption.requested():  # the trainer folds this rank's flag into its per-step all-reduce
        ...

The handler only records the signal, so a rank inside a collective or a kernel is never
interrupted mid-way; the trainer combines the flag across ranks each step so that every rank stops
at the same step even when only one of them was signalled. A second signal of the same run falls
back to the default action (terminate), for an operator who really means it.
"""
from __future__ import annotations

import signal
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: Optional[str] = None


def _handler(signum, frame) -> None:
    global _received
    if _received is not None:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _received = signal.Signals(signum).name


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def requested() -> Optional[str]:
    """The name of the signal that asked to stop (e.g. "SIGTERM"), or None."""
    return _received


def reset() -> None:
    global _received
    _received = None
