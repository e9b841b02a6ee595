"""The weights of the loss terms: the run config's `loss` section and what a task's forward reads
(no heavy imports: the run config is read before torch is)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossWeights:
    """The weights of the loss terms a task sums (the run config's `loss` section)."""
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 0.25
    # ITM hard negatives: never draw a candidate whose caption (token ids) is identical to the
    # positive's, a false negative with repeated captions; off = the reference's sampling
    itm_skip_identical_text: bool = False
