"""Which parameters a task trains (its `trainable` patterns; docs/MODEL.md section 5 for the pretraining
stages); the rest are frozen.

Frozen parameters get requires_grad=False and are left out of the optimizer, so neither gradients
nor weight decay can move them.
"""
from __future__ import annotations

import re

from torch import nn

from vlmo_large.tasks.registry import get_task


def is_trainable(task, name: str) -> bool:
    """Whether `task` (a Task or its name) trains the VLMo parameter `name`."""
    patterns = get_task(task).trainable
    return patterns is None or any(re.fullmatch(p, name) for p in patterns)


def apply_stage_freezing(model: nn.Module, task) -> tuple[int, int]:
    """Set requires_grad per task on VLMo; returns (trainable, frozen) parameter counts."""
    task = get_task(task)
    counts = [0, 0]
    for name, param in model.named_parameters():
        trainable = is_trainable(task, name)
        param.requires_grad_(trainable)
        counts[0 if trainable else 1] += param.numel()
    return counts[0], counts[1]
