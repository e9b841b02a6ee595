"""Collectives for evaluation: metrics over the whole held-out split, not one rank's share of it.

All are no-ops without torch.distributed or with a one-rank group, so evaluation code is written
once. The default group is the data-parallel group: under tensor parallelism every TP rank holds
the same samples, so gathering over the whole world would count them several times.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def default_group():
    """megatron-core's data-parallel group when the model-parallel groups exist, else the world."""
    try:
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_data_parallel_group()
    except ImportError:
        pass
    return None  # torch.distributed's default (world) group


def group_size(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_rows(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order; ranks may hold different
    numbers of rows (the last shard of a split is usually shorter)."""
    world = group_size(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    # all_gather needs equal shapes: pad to the longest, then cut each back.
    padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def sum_over_ranks(values: torch.Tensor, group=None) -> torch.Tensor:
    if group_size(group) > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def vocab_parallel_argmax(logits: torch.Tensor, group=None, rank: int = 0) -> torch.Tensor:
    """argmax over a vocabulary split across `group` (rank r holds ids [r*V/tp, (r+1)*V/tp)).
    Ties go to the lowest id, as torch.argmax on the full logits."""
    local_max, local_arg = logits.max(-1)
    world = group_size(group)
    if world == 1:
        return local_arg
    maxes = [torch.empty_like(local_max) for _ in range(world)]
    args = [torch.empty_like(local_arg) for _ in range(world)]
    dist.all_gather(maxes, local_max.contiguous(), group=group)
    dist.all_gather(args, (local_arg + rank * logits.shape[-1]).contiguous(), group=group)
    best_rank = torch.stack(maxes).argmax(0, keepdim=True)  # first maximum: the lowest rank
    return torch.stack(args).gather(0, best_rank)[0]
