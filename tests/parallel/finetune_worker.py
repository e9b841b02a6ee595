"""One optimizer step of each fine-tuning task (vqa, nlvr2, retrieval, in turn) through the trainer
(setup: the task's heads, --init from a plain weights file, freezing, the DeepSpeed engine; then
train_step; PipelineTrainer where pp > 1, as the launcher picks it) at each of several TP x PP x ZeRO
layouts, one after the other in one torchrun launch (one start-up for all).

Under torchrun: argv = weights_dir out_dir tp:pp:zero[,tp:pp:zero...] (dp = world / (tp * pp)).
weights_dir holds <task>.safetensors, the tiny model with the task's heads (`task_model`); every
layout starts from it and from the same global batch (`global_batch`, split by data-parallel rank).
Rank 0 saves out_dir/tp<tp>_pp<pp>_zero<zero>.pt:
    {task: {"ranks": [{"dp": r, "tp": t, "pp": s, "terms": train_step's data-parallel means}],
            "weights": plain state dict after the step (TP-merged, stages and ZeRO-3 gathered)}}
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
# The new heads step in lr groups of their own, which every layout must keep. 2, not the recipes' 20:
# Adam's first step magnifies the heads' reduction-order noise by their lr (at 10 the worst head
# tensor reached 84% of the tolerance at TP=2, at 2 it is 17%)
HEAD_LR_MULT = 2.0
OPTIM = {**layout_worker.OPTIM, "head_lr_mult": HEAD_LR_MULT}  # stage 3's clip keeps that noise under eps


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


def run_config(name: str, weights: str, out_dir: str, tp: int, pp: int, dp: int):
    from vlmo_large.training.run_config import RunConfig, build_dataclass

    return build_dataclass(RunConfig, {
        "preset": "tiny", "stage": name, "seed": layout_worker.SEED, "init": weights, "output_dir": out_dir,
        "task": {"num_answers": NUM_ANSWERS}, "data": {"source": "random"}, "parallel": {"tp": tp, "pp": pp},
        # one micro-batch per rank: retrieval's ITC spans one micro-batch, so the step's is the global batch's
        "batch": {"micro": GLOBAL_BATCH // dp, "grad_accum": 1}, "optim": dict(OPTIM),
        "schedule": {"steps": 10, "warmup": 0}, "checkpoint": {"every": 0}})


def one_step(name: str, weights: str, out_dir: str, tp: int, pp: int, zero: int) -> dict:
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state

    from vlmo_large.parallel import state
    from vlmo_large.parallel.sharding import gather_full_state_dict
    from vlmo_large.training.engine import is_zero3
    from vlmo_large.training.pipeline_module import gather_plain_state_dict
    from vlmo_large.training.pipeline_trainer import PipelineTrainer
    from vlmo_large.training.trainer import Trainer
    from vlmo_large.training.validation import resolve_run

    dp = dist.get_world_size() // (tp * pp)
    cfg = run_config(name, weights, os.path.join(out_dir, name), tp, pp, dp)
    trainer = (PipelineTrainer if pp > 1 else Trainer)(
        cfg, resolve_run(cfg, layout_worker.ds_config(zero), dist.get_world_size()))
    trainer.setup()
    assert trainer.engine.zero_optimization_stage() == zero
    terms = trainer.train_step(iter([local_batch(global_batch(name, trainer.model.cfg), state.dp_rank(), dp)]))

    ranks = [None] * dist.get_world_size()
    mine = {"dp": state.dp_rank(), "tp": state.tp_rank(), "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "terms": terms}
    dist.all_gather_object(ranks, mine)
    if pp > 1:
        after = gather_plain_state_dict(trainer.engine.module)
    else:
        params = list(trainer.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if is_zero3(trainer.engine) \
                else nullcontext():
            after = gather_full_state_dict(trainer.model, state.tp_group())
    trainer.engine.destroy()  # its ZeRO-3 hooks must not reach the next task's model
    return {"ranks": ranks, "weights": after}


def main(weights_dir: str, out_dir: str, layouts: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from vlmo_large.parallel import state

    for layout in layouts.split(","):
        tp, pp, zero = map(int, layout.split(":"))
        state.ensure_initialized(tp, pp)  # the world size is needed before the trainer's setup
        results = {name: one_step(name, os.path.join(weights_dir, f"{name}.safetensors"), out_dir, tp, pp, zero)
                   for name in TASKS}
        if dist.get_rank() == 0:
            torch.save(results, os.path.join(out_dir, f"tp{tp}_pp{pp}_zero{zero}.pt"))
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    dist.barrier()
    state.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:4])
