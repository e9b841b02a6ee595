"""Console output of rank 0; every other rank prints nothing.

On a terminal: one tqdm bar (step, loss, samples/s, ETA) plus a summary line per log interval.
Anywhere else (a file under Slurm or CI, a pipe): only the summary lines, one plain line each,
because a bar redrawn with carriage returns makes one line of hundreds of kilobytes in a file.
The summary line carries the data pipeline's skip counts once any is non-zero.
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO

from tqdm import tqdm


def summary_line(step: int, total: int, metrics: dict, lr: float, samples_per_s: float,
                 skipped: Optional[dict] = None) -> str:
    parts = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    line = f"step {step}/{total} {parts} lr={lr:.3e} samples/s={samples_per_s:.2f}"
    counts = {k: v for k, v in (skipped or {}).items() if v}
    if counts:
        line += " skipped " + ",".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return line


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, log_every: int, stream: Optional[TextIO] = None):
        self.enabled, self.log_every, self.total = enabled, log_every, total
        self.stream = stream or sys.stdout
        interactive = enabled and self.stream.isatty()
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step", desc="train",
                        smoothing=0.1, file=self.stream) if interactive else None

    def update(self, step: int, metrics: dict, samples_per_s: float, lr: float,
               skipped: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{samples_per_s:.2f}", refresh=False)
            self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            self.write(summary_line(step, self.total, metrics, lr, samples_per_s, skipped))

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
