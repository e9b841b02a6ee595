"""The MoME block (spec section 1): shared attention, then one FFN expert per modality.

    x = x + DropPath(gamma_1 * Attn(norm1(x)))
    x = x + DropPath(gamma_2 * FFN_e(norm2_e(x)))

`route` picks the expert: "imag", "text", "vl", or "pair" (text slice [:text_len] to the text
expert, the image slice after it to the vision expert: a contiguous split, no gather).
`queries=n` computes the block's output for the first n positions only (all positions still serve
as keys and values): what a last layer needs when only CLS, or only the text, is read out.
`separate=True` (a packed pass, [text ; image] of two unrelated passes): attention stays inside
[:text_len] and [text_len:]. DropPath then draws one decision per sample for both sequences, where
two separate passes draw one each: the same numbers only without drop path (eval, or a rate of 0).

Activation checkpointing is set per block (`set_checkpointing`, applied by parallelize): the
block's forward is replaced in place by one that recomputes it in backward, so the forward code
decides nothing per call and parameter names stay as they are.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmo_large.config import ModelConfig
from vlmo_large.model.attention import SelfAttention
from vlmo_large.model.relative_position import RelativePositionBias
from vlmo_large.model.tensor_parallel import ColumnLinear, RowLinear, mark_tensor_parallel

EXPERTS = ("text", "imag", "vl")


class Expert(nn.Module):
    """LayerNorm + FFN (Linear -> exact GELU -> Linear), fc1 column- and fc2 row-parallel."""

    def __init__(self, dim: int, ffn_dim: int, eps: float, tp_group=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = ColumnLinear(dim, ffn_dim, tp_group=tp_group)
        self.fc2 = RowLinear(ffn_dim, dim, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class MoMEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, drop_path: float, tp_group=None):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.attn_drop, cfg.attention, tp_group)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_init = cfg.layer_scale_init  # gamma's initial value (model/initialization.py)
        if cfg.layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.rel_pos = None  # this layer's relative position table (the backbone reads it per pass)
        if cfg.use_rel_pos_bias:
            self.rel_pos = RelativePositionBias(cfg.grid_size, cfg.max_text_len_of_initckpt, self.attn.local_heads)
            mark_tensor_parallel(self.rel_pos.table, dim=1)
        names = EXPERTS if layer >= cfg.vl_start else EXPERTS[:2]
        self.experts = nn.ModuleDict({name: Expert(dim, cfg.ffn_dim, cfg.norm_eps, tp_group) for name in names})

    def _scale(self, gamma, x):
        return x if gamma is None else gamma * x

    def _ffn(self, x: torch.Tensor, route: str, text_len: int) -> torch.Tensor:
        if route == "pair" and text_len >= x.shape[1]:
            return self.experts["text"](x)
        if route == "pair":
            text, image = x.split([text_len, x.shape[1] - text_len], dim=1)  # one cat in backward
            return torch.cat([self.experts["text"](text), self.experts["imag"](image)], 1)
        return self.experts[route](x)

    def forward(self, x: torch.Tensor, route: str, bias: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, text_len: int = 0, queries: int | None = None,
                block_mask=None, separate: bool = False) -> torch.Tensor:
        attended = self.attn(self.norm1(x), bias, key_mask, queries, block_mask, text_len if separate else None)
        if queries is not None:
            x = x[:, :queries]
        x = x + self.drop_path(self._scale(self.gamma_1, attended))
        return x + self.drop_path(self._scale(self.gamma_2, self._ffn(x, route, text_len)))

    def set_checkpointing(self, on: bool) -> None:
        """Recompute this block in backward (training with gradients only), or stop doing so."""
        if on:
            self.forward = partial(_checkpointed_forward, self)
        else:
            self.__dict__.pop("forward", None)

    @property
    def checkpointed(self) -> bool:
        return "forward" in self.__dict__


def _checkpointed_forward(block: MoMEBlock, *args, **kwargs) -> torch.Tensor:
    if block.training and torch.is_grad_enabled():
        return checkpoint(MoMEBlock.forward, block, *args, use_reentrant=False, **kwargs)
    return MoMEBlock.forward(block, *args, **kwargs)


def apply_checkpointing(blocks, every: int) -> None:
    """Checkpoint every `every`-th block (by index; 0 turns it off everywhere)."""
    for index, block in enumerate(blocks):
        block.set_checkpointing(bool(every) and index % every == 0)
