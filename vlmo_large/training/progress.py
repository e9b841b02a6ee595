"""Console output of rank 0: one tqdm bar (step, loss, samples/s, ETA) and a summary line per
log interval. Every other rank prints nothing."""
from __future__ import annotations

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, log_every: int):
        self.enabled, self.log_every = enabled, log_every
        self.bar = tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True,
                        unit="step", desc="train", smoothing=0.1)

    def update(self, step: int, metrics: dict, samples_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{samples_per_s:.2f}", refresh=False)
        self.bar.update(1)
        if step % self.log_every == 0:
            parts = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            self.bar.write(f"step {step}/{self.bar.total} {parts} lr={lr:.3e} samples/s={samples_per_s:.2f}")

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
