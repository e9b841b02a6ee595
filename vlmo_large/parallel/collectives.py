"""Collectives over the data-parallel group for the global-batch losses (ITC, ITM negatives).

`all_gather_with_grad` is autograd-aware: its backward sums the incoming gradients of every rank
(a reduce-scatter) and hands each rank the slice of its own inputs. With DeepSpeed then averaging
gradients over data-parallel ranks, a loss that every rank computes on the gathered batch gets the
same gradient as one process computing it on the concatenated batch. (The VLMo reference gathers
without summing, which leaves its ITC gradient at 1/world of the true one.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


@torch.no_grad()
def gather_global_rows(local: torch.Tensor, wanted: torch.Tensor, group=None) -> torch.Tensor:
    """Rows `wanted` ([n] global indices, rank * B + b) of the rank-order concatenation of every
    rank's `local` ([B, ...], equal shapes); n must be equal on every rank. Equals
    all_gather_no_grad(local)[wanted] but moves only the wanted rows (ITM negatives: B images of
    the global batch instead of all of them): the indices are all-gathered (tiny), then each owner
    sends exactly the rows asked of it in one all_to_all_single (gloo and NCCL support its split
    sizes). The split sizes are needed on the host: one small transfer per call, only when world > 1.
    """
    world = _world(group)
    if world == 1:
        return local[wanted]
    rank, rows = _rank(group), local.shape[0]
    asked = all_gather_no_grad(wanted, group).view(world, -1)  # [requester, n]
    owners = torch.div(asked, rows, rounding_mode="floor")
    counts = F.one_hot(owners, world).sum(1)  # [requester, owner]
    counts = counts.cpu().tolist()  # the host transfer: split sizes are Python ints
    send_sizes = [counts[q][rank] for q in range(world)]
    receive_sizes = counts[rank]
    # rows asked of me, requester by requester, each in the requester's order: positions in `asked`
    flat = torch.arange(asked.numel(), device=asked.device).view_as(asked)
    position = torch.where(owners == rank, flat, asked.numel()).flatten().sort().values[:sum(send_sizes)]
    send = local[asked.flatten()[position] - rank * rows].contiguous()
    received = local.new_empty((sum(receive_sizes), *local.shape[1:]))
    dist.all_to_all_single(received, send, receive_sizes, send_sizes, group=group)
    # `received` holds my wanted rows grouped by owner (owner order), each group in my order
    order = torch.sort(owners[rank], stable=True).indices
    out = torch.empty_like(received)
    out[order] = received
    return out


def group_rank(group=None) -> int:
    return _rank(group)


def group_size(group=None) -> int:
    return _world(group)
