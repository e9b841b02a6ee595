"""What DeepSpeed wraps: the model and one task (vlmo_large/tasks/), as a module.

The losses themselves live with the tasks (tasks/losses.py and one file per task).
"""
from __future__ import annotations

import torch

from vlmo_large.data.masking import max_masked_tokens
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.loss_weights import LossWeights
from vlmo_large.tasks.registry import get_task


class TaskObjective(torch.nn.Module):
    """VLMo (as `.model`) and the loss of one task (a Task or its registered name).

    forward(batch, step) -> dict of scalars, "loss" the one to backpropagate. `step` seeds the task's
    random draws (the ITM negatives) with the seed and data-parallel rank (StepContext), so a
    resumed run draws the same as an uninterrupted one whatever the global RNG state. `loss`: the
    terms' weights (the run config's `loss` section). `mlm_prob`: the data's masking rate, whose cap
    (data.masking.max_masked_tokens) fixes the MLM head's slots per row; None (batches masked by
    another rule): every position.
    """

    def __init__(self, model, task, loss: LossWeights = LossWeights(), group=None, seed: int = 0,
                 mlm_prob: float | None = None):
        super().__init__()
        self.model, self.task, self.weights, self.group, self.seed = model, get_task(task), loss, group, seed
        self.mlm_slots = None if mlm_prob is None else max_masked_tokens(model.cfg.max_text_len, mlm_prob)

    def forward(self, batch: dict, step: int = 0) -> dict:
        ctx = StepContext(self.weights, self.group, self.seed, step, self.mlm_slots)
        return self.task.forward(self.model, batch, ctx)
