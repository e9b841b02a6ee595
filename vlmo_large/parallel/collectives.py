"""All-gathers over the data-parallel group for the global-batch losses (ITC, ITM negatives).

`all_gather_with_grad` is autograd-aware: its backward sums the incoming gradients of every rank
(a reduce-scatter) and hands each rank the slice of its own inputs. With DeepSpeed then averaging
gradients over data-parallel ranks, a loss that every rank computes on the gathered batch gets the
same gradient as one process computing it on the concatenated batch. (The VLMo reference gathers
without summing, which leaves its ITC gradient at 1/world of the true one.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(_world(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # sum over ranks, keep own rows: a reduce-scatter written as all-reduce, which gloo supports
        dist.all_reduce(grad, group=ctx.group)
        start = _rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate `tensor` (equal shapes on every rank) along dim 0 in rank order, with gradient."""
    if _world(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate along dim 0 in rank order; no gradient (pixels and token ids of ITM negatives)."""
    if _world(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_world(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, 0)


def group_rank(group=None) -> int:
    return _rank(group)


def group_size(group=None) -> int:
    return _world(group)
