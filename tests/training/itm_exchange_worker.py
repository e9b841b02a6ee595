"""Runs inside every rank of dist_worker.py's torchrun (2 ranks, gloo; one launch for both sets of
checks): ITM negative images fetched by all-to-all (collectives.gather_global_rows,
tasks.losses.itm_pairs). Each rank saves what it got to <out>/itm_exchange_rank<r>.pt;
test_itm_negatives_exchange.py checks it against one process's indexing.
"""
import os

import torch
import torch.distributed as dist

from tests.training.common import GLOBAL_BATCH, ITM_TRIALS, itm_inputs
from vlmo_large.parallel.collectives import gather_global_rows
from vlmo_large.tasks.losses import itm_pairs

ROW_TRIALS = 12


def global_rows(trial: int, dtype) -> torch.Tensor:
    """The same [GLOBAL_BATCH, 3, 4, 4] tensor on every rank; each rank holds its slice."""
    return torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=torch.Generator().manual_seed(trial)).to(dtype)


def wanted_rows(trial: int, rank: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * trial + rank)
    if trial == 0:  # every rank asks rank 0 only (one owner sends everything, the other nothing)
        return torch.randint(0, n, (n,), generator=gen)
    return torch.randint(0, GLOBAL_BATCH, (n,), generator=gen)  # repeats included


def record_exchange(out: str) -> None:
    """In the default process group (already initialised) of every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    B = GLOBAL_BATCH // world
    gathered_shapes = []  # every all_gather of the ITM step: images must not be among them
    real_all_gather = dist.all_gather

    def recording_all_gather(parts, tensor, *args, **kwargs):
        gathered_shapes.append(tuple(tensor.shape))
        return real_all_gather(parts, tensor, *args, **kwargs)

    dist.all_gather = recording_all_gather
    try:
        rows = []
        for trial in range(ROW_TRIALS):
            for dtype in (torch.float32, torch.bfloat16):
                local = global_rows(trial, dtype)[rank * B:(rank + 1) * B]
                wanted = wanted_rows(trial, rank, B)
                rows.append({"trial": trial, "dtype": dtype, "wanted": wanted,
                             "got": gather_global_rows(local, wanted)})
        gathered_shapes.clear()
        batch, i2t, t2i = itm_inputs(rank, world)
        pairs = []
        for trial in range(ITM_TRIALS):
            gen = torch.Generator().manual_seed(1000 * trial + rank)
            p = itm_pairs(batch, i2t, t2i, None, gen)
            pairs.append({k: p[k] for k in ("image_for_text", "text_for_image", "image", "text_ids", "text_mask",
                                            "labels")})
    finally:
        dist.all_gather = real_all_gather  # dist_worker's other checks run on in this process
    torch.save({"rows": rows, "pairs": pairs, "gathered_shapes": gathered_shapes},
               os.path.join(out, f"itm_exchange_rank{rank}.pt"))
