"""FlexAttention with the layer's relative position bias and key padding: no [B, H, L, L] tensor.

The bias enters through a `score_mod` that reads the layer's [heads, L, L] bias (as
relative_position.py gives it) at (head, query, key); its gradient is a dense [heads, L, L] tensor
written once per element, so no atomics pile onto shared table rows and the bias path stays as
deterministic as the gather that built it. Reading the table through the index instead would
save the per-layer [heads, L, L] gather (a few MB) but make the kernel's backward scatter-add into a
handful of table rows.

Key padding is a `mask_mod` in a BlockMask built once per encoder pass (`padding_block_masks`) and
shared by every layer; in a packed pass (two sequences in one, `separate_at`) the same mask_mod also
keeps each query to the keys of its own sequence. Every block of it is "partial" (the mask_mod runs everywhere): with at most
a few hundred positions and padding only inside the text, no 128-wide key block is ever wholly
padded, so a sparsity pattern would skip nothing; and this way the mask needs no pass over a
[B, L, L] tensor and no data-dependent shapes (it compiles without graph breaks).

torch's CPU kernel has no backward: on a CPU this path serves inference (and the tests, which
swap `_kernel` for the higher-order op's differentiable eager path).
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from vlmo_large.errors import UserError

_kernel = flex_attention  # module attribute so tests can swap in a differentiable CPU reference
_BLOCK = 128  # FlexAttention's default sparse block size


def padding_block_mask(key_mask: torch.Tensor, q_len: int, separate_at: int | None = None) -> BlockMask:
    """key_mask [B, L] (True = keep) -> BlockMask for q_len queries (the first ones) over L keys, every
    block partial. separate_at=T: positions before T and from T on are two sequences that never
    attend to each other (backbone.encode_image_and_text's packed pass)."""
    batch, kv_len = key_mask.shape
    q_blocks, kv_blocks = -(-q_len // _BLOCK), -(-kv_len // _BLOCK)
    device = key_mask.device
    kv_num_blocks = torch.full((batch, 1, q_blocks), kv_blocks, dtype=torch.int32, device=device)
    kv_indices = torch.arange(kv_blocks, dtype=torch.int32, device=device).expand(batch, 1, q_blocks, kv_blocks)

    def keep_key(b, h, q_idx, kv_idx):
        return key_mask[b, kv_idx]

    def keep_key_in_segment(b, h, q_idx, kv_idx):
        return key_mask[b, kv_idx] & ((q_idx < separate_at) == (kv_idx < separate_at))

    mask_mod = keep_key if separate_at is None else keep_key_in_segment
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices.contiguous(), mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def padding_block_masks(key_mask: torch.Tensor | None, seq_len: int, keep: int | None,
                        separate_at: int | None = None) -> dict[int, BlockMask]:
    """The BlockMasks one encoder pass needs, by query count: all queries, and `keep` for a last
    layer that computes only the first `keep` positions."""
    if key_mask is None:
        return {}
    lengths = {seq_len} | ({keep} if keep is not None else set())
    return {n: padding_block_mask(key_mask, n, separate_at) for n in lengths}


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                block_mask: BlockMask | None, scale: float) -> torch.Tensor:
    """q [B, H, Lq, d], k/v [B, H, L, d], bias [H, Lq, L] or None -> [B, H, Lq, d]."""
    if _kernel is flex_attention and q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)):
        raise UserError("model.attention 'flex' cannot train on a CPU (torch's CPU FlexAttention kernel has no "
                        "backward): use 'auto', 'sdpa' or 'explicit' there")
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
    return _kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
