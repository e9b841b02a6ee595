"""AdamW parameter groups and the learning-rate schedule (spec section 4)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

# No weight decay: biases, every norm, layer scales, CLS / mask tokens, positions, the relative
# table and the temperatures (decaying them pulls scales and offsets towards 0 for no benefit).
NO_DECAY = [r".*\.bias", r".*norm\d*\.(weight|bias)", r".*gamma_[12]", r".*cls_token", r".*mask_token",
            r".*pos_embed", r".*position_embeddings\.weight", r".*rel_pos\.table", r".*logit_scale"]


def decays(name: str) -> bool:
    return not any(re.fullmatch(p, name) for p in NO_DECAY)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters only (frozen ones never reach the optimizer)."""
    groups = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[decays(name)].append(param)
    return [g for g in ({"params": groups[True], "weight_decay": weight_decay, "name": "decay"},
                        {"params": groups[False], "weight_decay": 0.0, "name": "no_decay"}) if g["params"]]


@dataclass
class WarmupDecay:
    """lr multiplier: linear warmup from 0 over `warmup` steps, then linear or cosine decay to
    `min_ratio` at `total` steps."""

    warmup: int
    total: int
    decay: str = "linear"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape
