"""megatron-core's tensor-parallel layers, built the way this model uses them.

Megatron layers return (output, bias); the small wrappers here return the output only, so the
model reads like single-device code. build_model constructs them on meta, where megatron initialises
nothing; model/initialization.py then draws each full weight and keeps this rank's slice (megatron's
CPU-initialisation split), so a given seed gives the same logical weights at any TP size. A layer
built off meta (a standalone test layer) is initialised by megatron itself, with `init_normal`.

The tensor-parallel group is passed in (None: one process, no torch.distributed needed); nothing
here reads or creates a global group.

The TP layout is declared on each split parameter with megatron-core's attributes
(`mark_tensor_parallel`): `partition_dim` and `partition_stride` (a full tensor is cut into
stride x world chunks along that dim; rank r owns chunks r, r + world, ...; stride 3 keeps q|k|v,
stride `depth` keeps the relative table's per-layer head blocks). `placement`, `shard` and
`unshard` are the one definition of that layout: initialisation slices a rank's weights with it,
loaders cut plain weights for any TP size, checkpoint readers merge ranks back.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

init_normal = partial(nn.init.trunc_normal_, std=0.02)  # accepts generator=


def group_size(tp_group) -> int:
    """Ranks of a tensor-parallel group; None is one process."""
    return 1 if tp_group is None else tp_group.size()


def parallel_config(tp_group=None, params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    on_meta = torch.empty(0).device.type == "meta"  # inside `with torch.device("meta")`
    return ModelParallelConfig(tensor_model_parallel_size=group_size(tp_group), params_dtype=params_dtype,
                               use_cpu_initialization=True, perform_initialization=not on_meta,
                               gradient_accumulation_fusion=False)


class _PlainStateDict:
    """Keep megatron's empty `_extra_state` entries out of state dicts (plain, safetensors-able)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hooks(self):
        self._load_state_dict_pre_hooks.clear()


def _keep_group(layer: nn.Module, tp_group) -> None:
    """Hold exactly the group passed in. With None, megatron substitutes its global TP group when one
    exists; a multi-rank one would have split the weights, so that is refused (pass the group)."""
    if tp_group is None and group_size(layer.tp_group) > 1:
        raise ValueError(f"{type(layer).__name__} built with tp_group=None (one process) while megatron's "
                         f"global tensor-parallel group has {layer.tp_group.size()} ranks: pass tp_group")
    layer.tp_group = tp_group
    layer.tp_size = group_size(tp_group)
    layer.single_rank = layer.tp_size == 1


class ColumnLinear(_PlainStateDict, ColumnParallelLinear):
    """Output features split across TP ranks. `stride` keeps fused chunks (q|k|v) split per chunk."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, stride: int = 1, tp_group=None):
        super().__init__(in_features, out_features, config=parallel_config(tp_group), init_method=init_normal,
                         bias=bias, gather_output=False, stride=stride, tp_group=tp_group)
        mark_tensor_parallel(self.weight, dim=0, stride=stride)  # megatron skips this without init
        self._drop_extra_state_hooks()
        _keep_group(self, tp_group)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`bias` replaces the layer's own bias (attention's q|0|v bias)."""
        bias = self.bias if bias is None else bias
        if self.single_rank:  # nothing to communicate: one fused addmm, as nn.Linear
            return F.linear(x, self.weight, bias)
        out = super().forward(x)[0]
        return out if bias is None or bias is self.bias else out + bias


class RowLinear(_PlainStateDict, RowParallelLinear):
    """Input features split across TP ranks; the output is all-reduced, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp_group=None):
        super().__init__(in_features, out_features, config=parallel_config(tp_group), init_method=init_normal,
                         bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        mark_tensor_parallel(self.weight, dim=1)
        self._drop_extra_state_hooks()
        _keep_group(self, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class VocabEmbedding(VocabParallelEmbedding):
    """Vocabulary rows split across TP ranks; at one rank a plain lookup (megatron's forward needs a group)."""

    def __init__(self, vocab_size: int, dim: int, tp_group=None):
        super().__init__(vocab_size, dim, init_method=init_normal, config=parallel_config(tp_group),
                         tp_group=tp_group)
        mark_tensor_parallel(self.weight, dim=0)
        _keep_group(self, tp_group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return F.embedding(ids, self.weight)
        return super().forward(ids)


def vocab_embedding(vocab_size: int, dim: int, tp_group=None) -> VocabEmbedding:
    return VocabEmbedding(vocab_size, dim, tp_group)


def mark_tensor_parallel(param: nn.Parameter, dim: int = 0, stride: int = 1) -> nn.Parameter:
    """Tell megatron/DeepSpeed (grad-norm, checkpoints) that this parameter is split across TP."""
    param.tensor_model_parallel = True  # megatron's attribute names; set directly as its helper
    param.partition_dim = dim           # refuses to overwrite what its own init already set
    param.partition_stride = stride
    return param


def placement(param: torch.Tensor) -> tuple[int, int] | None:
    """(dim, stride) for a TP-split parameter, None when replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """TP rank `rank`'s slice of a full tensor split (dim, stride) over `world` ranks."""
    if world == 1:
        return full
    if full.shape[dim] % (stride * world):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not split into {stride} x {world} chunks")
    chunks = full.chunk(stride * world, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim).clone()


def unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard` given every rank's shard in rank order."""
    if len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][c] for c in range(stride) for r in range(len(shards))], dim=dim)
