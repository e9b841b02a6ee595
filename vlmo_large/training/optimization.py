"""AdamW parameter groups and the learning-rate schedule (docs/MODEL.md section 4).

Which parameters get weight decay (`optim.decay_rule`):
- "reference" (default): the reference VLMo's rule (unilm vlmo/modules/vlmo_utils.py, set_schedule):
  no decay for a parameter whose reference-layout name (formats/reference.py) contains one of
  REFERENCE_NO_DECAY as a substring: every bias (attention q_bias / v_bias and the relative
  position bias table included) and the LayerNorms named norm / norm1 / norm2 / LayerNorm. The
  expert norms (norm2_text ...), layer scales, logit scales, CLS token and positions are decayed.
  Parameters the reference does not have (the MIM head) take the same substrings on their own name.
- "vlmo_large": this project's earlier rule (VLMO_LARGE_NO_DECAY): no decay for biases, every norm,
  layer scales, CLS / mask tokens, positions, the relative table and the temperatures.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from vlmo_large.formats.reference import to_reference
from vlmo_large.training.run_config import DECAY_RULES

REFERENCE_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                      "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")

VLMO_LARGE_NO_DECAY = [r".*[._]bias", r".*norm\d*\.(weight|bias)", r".*gamma_[12]", r".*cls_token",
                       r".*mask_token", r".*pos_embed", r".*position_embeddings\.weight", r".*rel_pos\.table",
                       r".*logit_scale"]


def reference_name(name: str) -> str | None:
    """The reference-layout name of one of this project's parameters, under any wrapper prefix
    ("model." of the pretraining objective); None for a parameter the reference lacks."""
    parts = name.split(".")
    for start in range(len(parts)):
        renamed = to_reference({".".join(parts[start:]): None})
        if renamed:
            return next(iter(renamed))
    return None


def decays(name: str, rule: str = "reference") -> bool:
    if rule == "reference":
        target = reference_name(name) or name
        return not any(part in target for part in REFERENCE_NO_DECAY)
    if rule == "vlmo_large":
        return not any(re.fullmatch(p, name) for p in VLMO_LARGE_NO_DECAY)
    raise ValueError(f"unknown weight-decay rule {rule!r}; choose one of {DECAY_RULES}")


def param_groups(model: nn.Module, weight_decay: float, rule: str = "reference") -> list[dict]:
    """Two AdamW groups over the trainable parameters only (frozen ones never reach the optimizer)."""
    groups = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[decays(name, rule)].append(param)
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
