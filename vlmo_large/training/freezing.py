"""Which parameters each pretraining stage trains (spec section 5); the rest are frozen.

Frozen parameters get requires_grad=False and are left out of the optimizer, so neither gradients
nor weight decay can move them.
"""
from __future__ import annotations

import re

from torch import nn

# Patterns over VLMo's parameter names (full match). None: every parameter trains.
TRAINABLE = {
    # stage 1, masked image modeling: attention (+ its norm, layer scales, relative table), the
    # vision expert, the patch embedding, the final norm and the MIM head
    "mim": [r"backbone\.patch_embed\..*", r"backbone\.rel_pos\.table", r"backbone\.blocks\.\d+\.norm1\..*",
            r"backbone\.blocks\.\d+\.attn\..*", r"backbone\.blocks\.\d+\.gamma_[12]",
            r"backbone\.blocks\.\d+\.experts\.imag\..*", r"backbone\.norm\..*", r"mim_head\..*"],
    # stage 2, text-only MLM: text embeddings, modality embedding, language expert (+ its norm),
    # MLM head, relative table, final norm; attention stays as stage 1 left it
    "text_mlm": [r"backbone\.text_embeddings\..*", r"backbone\.modality_embed\..*",
                 r"backbone\.blocks\.\d+\.experts\.text\..*", r"mlm_head\..*", r"backbone\.rel_pos\.table",
                 r"backbone\.norm\..*"],
    "vl": None,
}


def is_trainable(stage: str, name: str) -> bool:
    patterns = TRAINABLE[stage]
    return patterns is None or any(re.fullmatch(p, name) for p in patterns)


def apply_stage_freezing(model: nn.Module, stage: str) -> tuple[int, int]:
    """Set requires_grad per stage on VLMo; returns (trainable, frozen) parameter counts."""
    if stage not in TRAINABLE:
        raise ValueError(f"unknown stage '{stage}'; choose one of {sorted(TRAINABLE)}")
    counts = [0, 0]
    for name, param in model.named_parameters():
        trainable = is_trainable(stage, name)
        param.requires_grad_(trainable)
        counts[0 if trainable else 1] += param.numel()
    return counts[0], counts[1]
