"""Shared multi-head self-attention of the MoME block (BEiT style: no k bias, fp32 softmax).

Two paths compute the same thing: `sdpa` folds the relative bias and key padding into one additive
mask for torch's fused kernel; `explicit` is the reference math, kept to test the fused one against.
`auto` (the default) takes SDPA except where torch has no fused kernel for it: on a CPU, a bias
that needs a gradient sends SDPA to its unfused math fallback, which also checks every row for
being fully masked; the explicit path is the same math without those passes (~6% of a base block).
Under tensor parallelism each rank owns `num_heads / tp` heads: qkv is column-parallel (split per
q/k/v chunk), the output projection row-parallel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_large.model.tensor_parallel import ColumnLinear, RowLinear, mark_tensor_parallel
from vlmo_large.parallel import state


def additive_mask(bias: torch.Tensor | None, key_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """bias [H, L, L] and key_mask [B, L] (True = keep) -> one additive mask for SDPA."""
    if key_mask is None:
        return None if bias is None else bias.unsqueeze(0).to(dtype)
    pad = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    pad = pad.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    return pad if bias is None else bias.unsqueeze(0).to(dtype) + pad


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        tp = state.tp_size()
        self.local_heads = num_heads // tp
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.backend = backend
        local_dim = self.local_heads * self.head_dim
        self.qkv = ColumnLinear(dim, 3 * dim, bias=False, stride=3)
        self.q_bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local_dim)))
        self.v_bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local_dim)))
        self.proj = RowLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, queries: int | None = None) -> torch.Tensor:
        """queries=n: only the first n positions attend (to all keys); returns [B, n, D]."""
        B, N, _ = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = self.qkv(x, bias=qkv_bias)
        q, k, v = qkv.view(B, N, 3, self.local_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if queries is not None:
            q, N = q[:, :, :queries], queries
            bias = None if bias is None else bias[:, :queries]
        if self._use_sdpa(q, bias):
            mask = additive_mask(bias, key_mask, q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        else:
            out = self._explicit(q, k, v, bias, key_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))

    def _use_sdpa(self, q: torch.Tensor, bias: torch.Tensor | None) -> bool:
        if self.backend != "auto":
            return self.backend == "sdpa"
        learned_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
        return not (q.device.type == "cpu" and learned_bias)

    def _explicit(self, q, k, v, bias, key_mask):
        logits = ((q * self.scale).float() @ k.float().transpose(-2, -1)).float()  # fp32 under autocast too
        # in place on the fresh logits: no [B, H, L, L] copies (matmul's backward keeps its inputs only)
        if bias is not None:
            logits += bias.unsqueeze(0).float()
        if key_mask is not None:
            logits.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
        probs = F.dropout(logits.softmax(dim=-1).type_as(v), self.attn_drop, self.training)
        return probs @ v
