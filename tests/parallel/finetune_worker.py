"""One optimizer step of each fine-tuning task (vqa, nlvr2, retrieval, in turn) through the trainer
(Trainer.setup: the task's heads, --init from a plain weights file, freezing, DeepSpeed engine; then
Trainer.train_step) at a TP x DP x ZeRO layout, in one torchrun launch.

Under torchrun: argv = weights_dir out_dir tp zero (dp = world / tp). weights_dir holds
<task>.safetensors, the tiny model with the task's heads (`task_model`); every layout starts from
it and from the same global batch (`global_batch`, split by data-parallel rank). Rank 0 saves
out_dir/result.pt:
    {task: {"ranks": [{"dp": r, "tp": t, "terms": train_step's data-parallel means}],
            "weights": plain state dict after the step (TP-merged, ZeRO-3-gathered)}}
The single-process reference is test_finetune_layouts.py.
"""
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from tests.parallel import layout_worker  # noqa: E402

TASKS = ("vqa", "nlvr2", "retrieval")
GLOBAL_BATCH = 4
NUM_ANSWERS = 7
HEAD_LR_MULT = 2.0  # the new heads get their own lr groups, which ZeRO must keep apart
OPTIM = {**layout_worker.OPTIM, "head_lr_mult": HEAD_LR_MULT}  # its clip keeps reduction-order noise under eps


def task_model(name: str):
    """The tiny model a run of task `name` builds: the task's model overrides and heads."""
    from vlmo_large.config import get_preset
    from vlmo_large.model import build_model
    from vlmo_large.tasks.options import TaskOptions
    from vlmo_large.tasks.registry import get_task

    task = get_task(name)
    cfg = get_preset("tiny", **dict(getattr(task, "model_overrides", None) or {}))
    return build_model(cfg, heads=task.heads(cfg, TaskOptions(num_answers=NUM_ANSWERS)), seed=0)


def global_batch(name: str, cfg) -> dict:
    """The loader's keys of the task's data kind (random_batches.py), the same on every layout."""
    from vlmo_large.tasks.registry import get_task
    from vlmo_large.training.random_batches import random_batch

    return random_batch(get_task(name).data_kind, cfg, GLOBAL_BATCH, torch.Generator().manual_seed(21),
                        num_answers=NUM_ANSWERS)


def local_batch(batch: dict, rank: int, world: int) -> dict:
    rows = GLOBAL_BATCH // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}  # tensors and host lists alike


def run_config(name: str, weights: str, out_dir: str, tp: int, dp: int):
    from vlmo_large.training.run_config import RunConfig, build_dataclass

    return build_dataclass(RunConfig, {
        "preset": "tiny", "stage": name, "seed": layout_worker.SEED, "init": weights, "output_dir": out_dir,
        "task": {"num_answers": NUM_ANSWERS}, "data": {"source": "random"}, "parallel": {"tp": tp},
        "batch": {"micro": GLOBAL_BATCH // dp, "grad_accum": 1}, "optim": dict(OPTIM),
        "schedule": {"steps": 10, "warmup": 0}, "checkpoint": {"every": 0}})


def one_step(name: str, weights: str, out_dir: str, tp: int, zero: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    from vlmo_large.parallel import state
    from vlmo_large.parallel.sharding import gather_full_state_dict
    from vlmo_large.training.engine import is_zero3
    from vlmo_large.training.trainer import Trainer
    from vlmo_large.training.validation import resolve_run

    dp = dist.get_world_size() // tp
    cfg = run_config(name, weights, os.path.join(out_dir, name), tp, dp)
    trainer = Trainer(cfg, resolve_run(cfg, layout_worker.ds_config(zero), dist.get_world_size()))
    trainer.setup()
    assert trainer.engine.zero_optimization_stage() == zero
    terms = trainer.train_step(iter([local_batch(global_batch(name, trainer.model.cfg), state.dp_rank(), dp)]))

    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"dp": state.dp_rank(), "tp": state.tp_rank(), "terms": terms})
    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if is_zero3(trainer.engine) else nullcontext():
        after = gather_full_state_dict(trainer.model, state.tp_group())
    trainer.engine.destroy()  # its ZeRO-3 hooks must not reach the next task's model
    return {"ranks": ranks, "weights": after}


def main(weights_dir: str, out_dir: str, tp: int, zero: int) -> None:
    import torch.distributed as dist

    from vlmo_large.parallel import state

    state.ensure_initialized(tp, 1)  # the world size is needed before the trainer's setup makes the groups
    results = {name: one_step(name, os.path.join(weights_dir, f"{name}.safetensors"), out_dir, tp, zero)
               for name in TASKS}
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out_dir, "result.pt"))
    dist.barrier()
    state.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
