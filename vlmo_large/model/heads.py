"""Pooler and pretraining heads (docs/MODEL.md sections 4 and 5)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_large.config import ModelConfig
from vlmo_large.model.tensor_parallel import ColumnLinear

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # the contrastive temperature 0.07 at the start, as CLIP and the reference


class Pooler(nn.Module):
    """Linear + tanh on the first token (the text CLS in fused sequences)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ContrastiveHeads(nn.Module):
    """Bias-free image and text projections with a learned temperature, for one ITC loss."""

    def __init__(self, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(dim, dim, bias=False)
        self.text_proj = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), INIT_LOGIT_SCALE))  # 1-d: DeepSpeed clips and broadcasts it

    def embed_image(self, image_cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image_cls), dim=-1)

    def embed_text(self, text_cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_cls), dim=-1)

    def forward(self, image_cls: torch.Tensor, text_cls: torch.Tensor):
        return self.embed_image(image_cls), self.embed_text(text_cls)


class MLMHead(nn.Module):
    """Linear + GELU + LayerNorm, then an untied vocab-parallel decoder with its own bias."""

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.dense = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.text_norm_eps)
        self.decoder = ColumnLinear(cfg.embed_dim, cfg.vocab_size, bias=True, tp_group=tp_group)
        self.tp_size = self.decoder.tp_size  # the loss needs it: logits cover 1 / tp_size of the vocabulary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """-> logits over this rank's slice of the vocabulary."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class MIMHead(nn.Module):
    """Stage 1: a mask token for the patch embedding and a linear predictor per masked patch.

    Target "pixel": the patch's normalised pixels (patch*patch*3 values); "token": visual-token ids.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        out = cfg.patch_size ** 2 * cfg.in_chans if cfg.mim_target == "pixel" else cfg.mim_vocab_size
        self.predictor = nn.Linear(cfg.embed_dim, out)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictor(hidden)


class ClassifierMLP(nn.Sequential):
    """The reference's fine-tuning classifier: Linear(in, hidden) -> LayerNorm -> GELU -> Linear(hidden,
    classes), so its state-dict keys are .0, .1 and .3 as in the reference's checkpoints
    (docs/MODEL.md section 8). `labels`: the class names in row order, when known (VQA's answers)."""

    def __init__(self, in_dim: int, hidden: int, classes: int, labels: tuple[str, ...] | None = None):
        super().__init__(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, classes))
        if labels is not None and len(labels) != classes:
            raise ValueError(f"{len(labels)} labels for a classifier of {classes} classes")
        self.labels = labels


def vqa_classifier(dim: int, num_answers: int, answers: tuple[str, ...] | None = None) -> ClassifierMLP:
    """VQA: the pooled fused CLS [D] -> 2D -> one logit per answer of the vocabulary."""
    return ClassifierMLP(dim, 2 * dim, num_answers, answers)


def nlvr2_classifier(dim: int) -> ClassifierMLP:
    """NLVR2: the two pooled fused CLS concatenated [2D] -> 2D -> false / true."""
    return ClassifierMLP(2 * dim, 2 * dim, 2)
