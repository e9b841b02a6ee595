"""Tensor-parallel placement of every parameter, declared on the parameter itself.

megatron-core's attributes say where a TP-split parameter's shard lies in the full tensor:
`partition_dim` and `partition_stride` (a full tensor is cut into stride x world chunks along that
dim; rank r owns chunks r, r + world, ...; stride 3 keeps q|k|v, stride `depth` keeps the relative
table's per-layer head blocks). Parameters without `tensor_model_parallel` are replicated. These
two functions are the single definition of the layout, used to load plain weights into any TP
size and to gather a TP model back into plain weights.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def placement(param: torch.Tensor) -> tuple[int, int] | None:
    """(dim, stride) for a TP-split parameter, None when replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
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
