"""One pipeline stage of VLMo, built without the others: the model on meta, then this stage's
tensors (parallel/layout.py stage_of) materialised with the values of the whole-model build."""
from __future__ import annotations

import torch
from torch import nn

from vlmo_large.config import ModelConfig
from vlmo_large.model import build_model
from vlmo_large.model.initialization import materialize
from vlmo_large.parallel.layout import stage_of


def stage_tensor_names(model: nn.Module, stage: int, pp: int) -> set[str]:
    """The parameter names of pipeline stage `stage` of `pp` (the one stage-split rule)."""
    return {name for name, _ in model.named_parameters() if stage_of(name, model.cfg.depth, pp) == stage}


def build_stage(cfg: ModelConfig | str, stage: int, pp: int, device: str | torch.device = "cpu",
                tp_group=None, seed: int | None = None, **build) -> nn.Module:
    """VLMo with only stage `stage`'s parameters on `device` (equal to the same tensors of
    build_model(cfg, device, tp_group, seed=seed)); every other parameter stays on meta, with
    no storage. `build`: the rest of build_model's arguments (heads, model overrides).

    seed=None draws the seed from torch's global generator as build_model does, so a pipeline rank
    that runs `torch.manual_seed(cfg.seed); build_stage(...)` holds the weights of the trainer's
    `torch.manual_seed(cfg.seed); build_model(...)`."""
    model = build_model(cfg, "meta", tp_group, seed=seed, **build)
    materialize(model, stage_tensor_names(model, stage, pp), device)
    return model
