"""Shared multi-head self-attention of the MoME block (BEiT style: no k bias, fp32 softmax).

Three paths compute the same thing: `sdpa` folds the relative bias and key padding into one additive
[B, H, L, L] mask for torch's fused kernel; `flex` (flex_attention.py) reads the bias in a score_mod
and the padding from a BlockMask, with no [B, H, L, L] tensor; `explicit` is the reference math,
kept to test the others against (and the deterministic one). `auto` (the default):
  - CPU: SDPA except where torch has no fused kernel for it: a bias that needs a gradient sends
    SDPA to its unfused math fallback, which also checks every row for being fully masked; the
    explicit path is the same math without those passes (~6% of a base block).
  - CUDA: flex when the block is compiled (parallelize sets `compiled`; unfused flex is slow),
    else SDPA; SDPA also when attention dropout is active (flex has none). Provisional until
    benchmarks/gpu_check.sh measures it (docs/PERFORMANCE.md).
The choice reads only the device, flags and `requires_grad`: torch.compile guards on those, no
graph break.
`separate_at=T` (a packed pass, backbone.encode_image_and_text): positions before T and from T on are
two sequences that do not attend to each other. Each path applies it where it already masks: a
mask_mod term (flex), -inf folded into the [H, Lq, L] bias before it meets the padding (sdpa), the
same masked_fill (explicit); no path builds a larger tensor than it does without it.
Under tensor parallelism each rank owns `num_heads / tp` heads: qkv is column-parallel (split per
q/k/v chunk), the output projection row-parallel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_large.model.flex_attention import flex_attend, padding_block_mask
from vlmo_large.model.tensor_parallel import ColumnLinear, RowLinear, group_size, mark_tensor_parallel


def same_segment(q_len: int, kv_len: int, separate_at: int, device) -> torch.Tensor:
    """[q_len, kv_len] bool: query i (the first q_len positions) may see key j when both lie before
    `separate_at` or both from it on."""
    return (torch.arange(q_len, device=device)[:, None] < separate_at) == \
        (torch.arange(kv_len, device=device)[None, :] < separate_at)


def additive_mask(bias: torch.Tensor | None, key_mask: torch.Tensor | None, dtype,
                  segment: torch.Tensor | None = None) -> torch.Tensor | None:
    """bias [H, L, L], key_mask [B, L] (True = keep) and segment [Lq, L] (same_segment) -> one
    additive mask for SDPA."""
    if segment is not None:  # -inf across sequences, in the bias: no tensor larger than without it
        base = torch.zeros(segment.shape, dtype=dtype, device=segment.device) if bias is None else bias.to(dtype)
        bias = base.masked_fill(~segment, float("-inf"))
    if key_mask is None:
        return None if bias is None else bias.unsqueeze(0).to(dtype)
    pad = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    pad = pad.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    return pad if bias is None else bias.unsqueeze(0).to(dtype) + pad


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, backend: str = "auto", tp_group=None):
        super().__init__()
        self.tp_size = group_size(tp_group)
        self.local_heads = num_heads // self.tp_size
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.compiled = False  # set by parallelize when this block runs under torch.compile
        local_dim = self.local_heads * self.head_dim
        self.qkv = ColumnLinear(dim, 3 * dim, bias=False, stride=3, tp_group=tp_group)
        self.q_bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local_dim)))
        self.v_bias = mark_tensor_parallel(nn.Parameter(torch.zeros(local_dim)))
        self.proj = RowLinear(dim, dim, bias=True, tp_group=tp_group)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, queries: int | None = None,
                block_mask=None, separate_at: int | None = None) -> torch.Tensor:
        """queries=n: only the first n positions attend (to all keys); returns [B, n, D].
        block_mask: the pass's shared FlexAttention padding mask for this query count (built here
        from key_mask when the flex path runs without one). separate_at=T: a packed pass, positions
        [:T] and [T:] attend only within themselves (needs key_mask: the packed pass always has one)."""
        if separate_at is not None and key_mask is None:
            raise ValueError("separate_at needs a key_mask (all True where nothing is padded)")
        B, N, _ = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = self.qkv(x, bias=qkv_bias)
        q, k, v = qkv.view(B, N, 3, self.local_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if queries is not None:
            q, N = q[:, :, :queries], queries
            bias = None if bias is None else bias[:, :queries]
        backend = self.choose_backend(q, bias)
        segment = None  # flex applies separate_at in its mask_mod
        if separate_at is not None and backend != "flex":
            segment = same_segment(N, k.shape[2], separate_at, x.device)
        if backend == "flex":
            if key_mask is not None and block_mask is None:
                block_mask = padding_block_mask(key_mask, N, separate_at)
            out = flex_attend(q, k, v, bias, block_mask if key_mask is not None else None, self.scale)
        elif backend == "sdpa":
            mask = additive_mask(bias, key_mask, q.dtype, segment)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        else:
            out = self._explicit(q, k, v, bias, key_mask, segment)
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))

    def choose_backend(self, q: torch.Tensor, bias: torch.Tensor | None) -> str:
        if self.backend != "auto":
            return self.backend
        if q.device.type == "cpu":
            learned_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
            return "explicit" if learned_bias else "sdpa"
        dropout = self.attn_drop > 0 and self.training
        return "flex" if self.compiled and not dropout else "sdpa"

    def may_use_flex(self, device: torch.device) -> bool:
        """Whether a pass on this device may take the flex path (its BlockMask is then built)."""
        return self.backend == "flex" or (self.backend == "auto" and device.type != "cpu" and self.compiled)

    def _explicit(self, q, k, v, bias, key_mask, segment=None):
        logits = ((q * self.scale).float() @ k.float().transpose(-2, -1)).float()  # fp32 under autocast too
        # in place on the fresh logits: no [B, H, L, L] copies (matmul's backward keeps its inputs only)
        if bias is not None:
            logits += bias.unsqueeze(0).float()
        keep = None if key_mask is None else key_mask[:, None, None, :]
        if segment is not None:
            keep = segment if keep is None else keep & segment
        if keep is not None:
            logits.masked_fill_(~keep, float("-inf"))
        probs = F.dropout(logits.softmax(dim=-1).type_as(v), self.attn_drop, self.training)
        return probs @ v
