"""megatron-core's tensor-parallel layers, built the way this model uses them.

Megatron layers return (output, bias); the small wrappers here return the output only, so the
model reads like single-device code. Weights are initialised on a full "master" tensor and split
(megatron's CPU initialisation), so a given seed gives the same logical weights at any TP size.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from timm.layers import trunc_normal_
from torch import nn

from vlmo_large.parallel import state

init_normal = partial(trunc_normal_, std=0.02)


def parallel_config(params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    on_meta = torch.empty(0).device.type == "meta"  # inside `with torch.device("meta")`
    return ModelParallelConfig(tensor_model_parallel_size=state.tp_size(), params_dtype=params_dtype,
                               use_cpu_initialization=True, perform_initialization=not on_meta,
                               gradient_accumulation_fusion=False)


class _PlainStateDict:
    """Keep megatron's empty `_extra_state` entries out of state dicts (plain, safetensors-able)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hooks(self):
        self._load_state_dict_pre_hooks.clear()


class ColumnLinear(_PlainStateDict, ColumnParallelLinear):
    """Output features split across TP ranks. `stride` keeps fused chunks (q|k|v) split per chunk."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, stride: int = 1):
        super().__init__(in_features, out_features, config=parallel_config(), init_method=init_normal,
                         bias=bias, gather_output=False, stride=stride, tp_group=state.tp_group())
        mark_tensor_parallel(self.weight, dim=0, stride=stride)  # megatron skips this without init
        self._drop_extra_state_hooks()
        self.single_rank = self.tp_group is None or self.tp_group.size() == 1

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`bias` replaces the layer's own bias (attention's q|0|v bias)."""
        bias = self.bias if bias is None else bias
        if self.single_rank:  # nothing to communicate: one fused addmm, as nn.Linear
            return F.linear(x, self.weight, bias)
        out = super().forward(x)[0]
        return out if bias is None or bias is self.bias else out + bias


class RowLinear(_PlainStateDict, RowParallelLinear):
    """Input features split across TP ranks; the output is all-reduced, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, config=parallel_config(), init_method=init_normal,
                         bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group())
        mark_tensor_parallel(self.weight, dim=1)
        self._drop_extra_state_hooks()
        self.single_rank = self.tp_group is None or self.tp_group.size() == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


def vocab_embedding(vocab_size: int, dim: int) -> VocabParallelEmbedding:
    embedding = VocabParallelEmbedding(vocab_size, dim, init_method=init_normal, config=parallel_config(),
                                       tp_group=state.tp_group())
    mark_tensor_parallel(embedding.weight, dim=0)
    return embedding


def mark_tensor_parallel(param: nn.Parameter, dim: int = 0, stride: int = 1) -> nn.Parameter:
    """Tell megatron/DeepSpeed (grad-norm, checkpoints) that this parameter is split across TP."""
    param.tensor_model_parallel = True  # megatron's attribute names; set directly as its helper
    param.partition_dim = dim           # refuses to overwrite what its own init already set
    param.partition_stride = stride
    return param
