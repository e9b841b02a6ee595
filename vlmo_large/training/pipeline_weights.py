"""Plain VLMo weights <-> the pipeline layers of one stage, at any TP size; freezing and AdamW
groups by VLMo name.

A pipeline layer names its parameters locally ("block.attn.qkv.weight" in block layer 2) and maps
each to its VLMo name ("backbone.blocks.2.attn.qkv.weight"; the block's relative table included).
TP slicing reuses the placement attributes of sharding.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vlmo_large.parallel import state
from vlmo_large.parallel.sharding import gather_full_state_dict, local_state_dict
from vlmo_large.training.freezing import is_trainable
from vlmo_large.training import optimization

def local_layers(pipe) -> list:
    """The pipeline layers built on this stage, in order."""
    return list(pipe.forward_funcs)


def freeze_for_stage(pipe, stage: str) -> None:
    """training/freezing.py's rule of each stage, by VLMo name."""
    for name, param in named_plain_parameters(pipe):
        param.requires_grad_(is_trainable(stage, name))


def named_plain_parameters(pipe):
    """(VLMo name, parameter) of this stage's layers."""
    for layer in local_layers(pipe):
        for name, param in layer.named_parameters():
            yield layer.plain_name(name), param


def param_groups(pipe, weight_decay: float, rule: str = "reference") -> list[dict]:
    """training/optimization.py's AdamW groups (`optim.decay_rule`), by VLMo name."""
    return optimization.param_groups(SimpleNamespace(named_parameters=lambda: named_plain_parameters(pipe)),
                                     weight_decay, rule)


def load_plain_state_dict(pipe, full: dict[str, torch.Tensor]) -> None:
    """Load this stage's layers from a plain VLMo state dict (full tensors)."""
    rank, world = state.tp_rank(), state.tp_size()
    for layer in local_layers(pipe):
        plain = {name: full[layer.plain_name(name)] for name in layer.state_dict()}
        layer.load_state_dict(local_state_dict(layer, plain, rank, world))


def gather_plain_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Plain VLMo tensors of every stage's layers, on every rank (for tests and small exports:
    it moves the whole model through all_gather_object; DeepSpeed's checkpoints are per layer)."""
    part = {}
    for layer in local_layers(pipe):
        for name, tensor in gather_full_state_dict(layer, state.tp_group()).items():
            part[layer.plain_name(name)] = tensor
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, part, group=parallel_state.get_pipeline_model_parallel_group())
    return {k: v for p in parts for k, v in p.items()}
