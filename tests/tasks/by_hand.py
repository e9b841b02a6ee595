"""The fine-tuning heads computed by hand, in float64, from the model's own parameters."""
from __future__ import annotations

import math

import torch


def pooled(pooler, hidden: torch.Tensor) -> torch.Tensor:
    """tanh(W h_0 + b) of the first token."""
    dense = pooler.dense
    return torch.tanh(hidden[:, 0].double() @ dense.weight.double().T + dense.bias.double())


def classifier(head, x: torch.Tensor) -> torch.Tensor:
    """Linear -> LayerNorm -> exact GELU -> Linear, as the reference's Sequential."""
    first, norm, _, last = head
    h = x.double() @ first.weight.double().T + first.bias.double()
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ last.weight.double().T + last.bias.double()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
    return -log_probs[torch.arange(len(labels)), labels].mean()

