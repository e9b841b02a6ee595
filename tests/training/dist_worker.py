"""Runs inside every rank of `torchrun --nproc_per_node 2` (gloo, ZeRO-3, tiny): the multi-process
checks of tests/training, each writing what it observed to <out>/<check>.pt from rank 0
(itm_exchange_worker.py's from every rank). The assertions against independent single-process
computations live in test_multi_rank.py and test_itm_negatives_exchange.py.

    torchrun --standalone --nproc_per_node 2 tests/training/dist_worker.py OUT_DIR
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.training.common import (GLOBAL_BATCH, ITM_TRIALS, itc_inputs, itm_inputs, run_config,  # noqa: E402
                                   ds_config, fresh_heads)
from tests.training.itm_exchange_worker import record_exchange  # noqa: E402
from vlmo_large.parallel import state  # noqa: E402


def save(out: str, name: str, obj) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, os.path.join(out, f"{name}.pt"))


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def check_itc(out: str) -> None:
    from vlmo_large.tasks.losses import contrastive_loss

    rank, world = dist.get_rank(), dist.get_world_size()
    heads = fresh_heads()
    images, texts = itc_inputs()
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss, _, _ = contrastive_loss(*heads(images[local], texts[local]), heads.logit_scale, state.dp_group())
    loss.backward()
    # DeepSpeed's data-parallel gradient averaging, written out
    save(out, "itc", {"loss": reduce_mean(loss).item(),
                      "grads": {n: reduce_mean(p.grad) for n, p in heads.named_parameters()}})


def check_itm(out: str) -> None:
    from vlmo_large.tasks.losses import itm_pairs

    rank = dist.get_rank()
    batch, i2t, t2i = itm_inputs(rank, dist.get_world_size())
    draws = []
    for trial in range(ITM_TRIALS):
        gen = torch.Generator().manual_seed(1000 * trial + rank)
        pairs = itm_pairs(batch, i2t, t2i, state.dp_group(), gen)
        draws.append({k: pairs[k] for k in ("image_for_text", "text_for_image", "image", "text_ids", "labels")})
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, draws)
    save(out, "itm", everyone)


def train(out: str, name: str, stop_at=None, **overrides):
    from vlmo_large.training.trainer import Trainer
    from vlmo_large.training.validation import resolve_run

    cfg = run_config(os.path.join(out, name), **overrides)
    return Trainer(cfg, resolve_run(cfg, ds_config(3), dist.get_world_size())).run(stop_at)


def check_training(out: str) -> None:
    steps = 2  # per half: the restart check needs steps after the resume, not many
    full = train(out, "full", **{"schedule.steps": 2 * steps, "checkpoint.every": steps})
    first = train(out, "restart", stop_at=steps, **{"schedule.steps": 2 * steps, "checkpoint.every": steps})
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it inherits
    second = train(out, "restart", **{"schedule.steps": 2 * steps, "checkpoint.every": steps, "resume": "auto"})
    overfit = train(out, "overfit", **{"schedule.steps": 12, "data.random_distinct": 1, "optim.lr": 3e-3,
                                       "schedule.warmup": 1})
    frozen = train(out, "text_mlm", **{"stage": "text_mlm", "schedule.steps": 3, "optim.lr": 1e-2})
    save(out, "training", {"full": full, "first": first, "second": second, "overfit": overfit,
                           "text_mlm": frozen})


def main() -> None:
    out = sys.argv[1]
    state.ensure_initialized(1, 1)
    record_exchange(out)  # test_itm_negatives_exchange.py's ranks
    check_itc(out)
    check_itm(out)
    check_training(out)
    dist.barrier()
    state.destroy()


if __name__ == "__main__":
    main()
