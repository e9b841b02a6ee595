"""Whole state dicts <-> a tensor-parallel model's: this rank's slice of plain weights, and the
plain weights (or gradients) gathered from every rank, by the layout model/tensor_parallel.py
defines (placement, shard, unshard)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vlmo_large.model.tensor_parallel import placement, shard, unshard


def local_state_dict(model: nn.Module, full: dict[str, torch.Tensor], rank: int, world: int) -> dict:
    """This TP rank's slice of a plain (full) state dict, keyed like `model.state_dict()`."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in full.items():
        where = placement(params[name]) if name in params else None
        out[name] = tensor if where is None else shard(tensor, *where, rank, world)
    return out


def gather_full_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Plain (full) tensors of a TP model, assembled on every rank of the TP `group` (CPU copies)."""
    world = dist.get_world_size(group) if dist.is_initialized() and group is not None else 1
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in model.state_dict().items():
        where = placement(params[name]) if name in params else None
        if where is None or world == 1:
            out[name] = tensor.detach().cpu().clone()
            continue
        pieces = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(pieces, tensor.detach().contiguous(), group=group)
        out[name] = unshard([p.cpu() for p in pieces], *where)
    return out


def gather_full_grads(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Full gradients of a TP model (replicated parameters' gradients are identical on every rank)."""
    world = dist.get_world_size(group) if dist.is_initialized() and group is not None else 1
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        where = placement(param)
        if where is None or world == 1:
            out[name] = param.grad.detach().cpu().clone()
            continue
        pieces = [torch.empty_like(param.grad) for _ in range(world)]
        dist.all_gather(pieces, param.grad.detach().contiguous(), group=group)
        out[name] = unshard([p.cpu() for p in pieces], *where)
    return out
