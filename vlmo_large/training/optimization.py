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
`optim.no_decay` adds glob patterns to either rule.

Learning rates (fine-tuning): `optim.layer_decay` (BEiT's layer-wise decay) and `optim.head_lr_mult`
(the task's new heads, e.g. the reference's 20x on the VQA / NLVR2 classifiers) give each group its
own lr (run_param_groups); without them every group runs at optim.lr.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable

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


def param_groups(model: nn.Module, weight_decay: float, rule: str = "reference", no_decay=(),
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """AdamW groups over the trainable parameters only (frozen ones never reach the optimizer):
    "decay" and "no_decay" (`no_decay`: more exempt names, glob patterns), and with `lr_scale`
    (name -> lr multiplier, lr_scales) one pair per multiplier, each group's `lr_scale` set."""
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decayed = decays(name, rule) and not any(fnmatch.fnmatchcase(name, p) for p in no_decay)
            groups.setdefault((decayed, lr_scale(name) if lr_scale else 1.0), []).append(param)
    out = []
    # the groups at the run's own lr first: the progress output reports the first group's lr
    for decayed, scale in sorted(groups, key=lambda key: (key[1] != 1.0, not key[0], -key[1])):
        name = ("decay" if decayed else "no_decay") + ("" if scale == 1.0 else f"@lr_x{scale:.6g}")
        group = {"params": groups[decayed, scale], "weight_decay": weight_decay if decayed else 0.0, "name": name}
        out.append({**group, "lr_scale": scale} if lr_scale else group)
    return out


_BLOCK = re.compile(r"(?:^|\.)backbone\.blocks\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)backbone\.(patch_embed|text_embeddings|modality_embed)\.")


def lr_scales(depth: int, layer_decay: float = 1.0, heads=(), head_lr_mult: float = 1.0) -> Callable[[str], float]:
    """name -> lr multiplier: layer-wise decay (BEiT's: block i at layer_decay^(depth - i), the
    embeddings at layer_decay^(depth + 1), the final norm, pooler and heads at 1) times
    `head_lr_mult` for the modules named in `heads` (a task's new heads, Task.heads)."""
    def scale(name: str) -> float:
        parts = name.split(".")
        if any(part in heads for part in parts[:2]):  # "vqa_classifier.0.weight", "model.vqa_classifier..."
            return head_lr_mult
        block = _BLOCK.search(name)
        if block:
            return layer_decay ** (depth - int(block.group(1)))
        return layer_decay ** (depth + 1) if _EMBEDDINGS.search(name) else 1.0
    return scale


def run_param_groups(model: nn.Module, optim, depth: int, heads=()) -> list[dict]:
    """The run config's groups (`optim`: its OptimConfig): decay rule and exemptions, and where
    layer decay or a head multiplier is set, each group's own lr (optim.lr times its multiplier;
    the schedule scales every group alike)."""
    if optim.layer_decay == 1.0 and (optim.head_lr_mult == 1.0 or not heads):
        return param_groups(model, optim.weight_decay, optim.decay_rule, optim.no_decay)
    groups = param_groups(model, optim.weight_decay, optim.decay_rule, optim.no_decay,
                          lr_scales(depth, optim.layer_decay, tuple(heads), optim.head_lr_mult))
    return [{**g, "lr": optim.lr * g["lr_scale"]} for g in groups]


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
