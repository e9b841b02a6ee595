"""DeepSpeed's pipeline engine over a task (training/pipeline_module.py), and its steps.

A step of M micro-batches:
  1. a task with probe passes (stage vl: the ITC logits that pick the ITM hard negatives) first
     runs them with `engine.eval_batch`, no grad, without their VL branch; the last stage computes
     `Task.probe` of each micro-batch, which goes to the first stage (broadcast over the pipeline);
  2. the first stage builds every pass's inputs (`Task.inputs` with the probe: stage vl draws the
     negatives from the one-process step's generator, StepContext, so both paths draw the same);
  3. `engine.train_batch` (or, for held-out evaluation, `engine.eval_batch`) over all passes; the
     last stage scores them (`Task.score`).
Held-out metrics (`heldout_parts`) are one `engine.eval_batch` over the passes of
`Task.heldout_inputs`; the last stage computes `Task.heldout_batch` of each micro-batch, which goes
to every stage, where `Task.heldout_reduce` sums it over data parallel.
Cost of step 1 at stage vl: one forward of the image and text streams without backward, VL branch
or fused pairs, ~7% of the step's compute at 224 px / 40 tokens, plus one pipeline fill and drain.
Its logits come from eval mode (no drop path), where one process takes them from its training
forward: the same numbers when drop path is 0.
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from vlmo_large.parallel import state
from vlmo_large.parallel.layout import validate_layout
from vlmo_large.parallel.pipeline_topology import pipeline_topology
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.loss_weights import LossWeights
from vlmo_large.tasks.registry import get_task
from vlmo_large.training.engine import model_dtype, prepare_deepspeed
from vlmo_large.training.optimization import run_param_groups
from vlmo_large.training.pipeline_module import TaskPipeline, first_stage_inputs


def build_pipeline_engine(model, task, ds_config: dict, tensor_parallel: int, pipeline_parallel: int,
                          optim, heads=(), lr_scheduler=None):
    """`model`: VLMo built whole with this rank's TP group (state.ensure_initialized first) and
    frozen for the task; this rank keeps its stage of it. AdamW groups by VLMo name, as one
    process's (`optim`: the run's OptimConfig; `heads`: the task's new modules), the same list of
    groups on every stage (stage_aligned_groups)."""
    world = dist.get_world_size()
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    validate_layout(model.cfg, tensor_parallel, pipeline_parallel,
                    world // (tensor_parallel * pipeline_parallel), zero, world)
    prepare_deepspeed(dist.get_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # DeepSpeed's TP "pipe partitioning" splits only the first tensor of the tuple and assumes the
    # others need no gradient; every stream here needs one, so whole tensors are sent.
    ds_config = dict(ds_config, pipeline=dict(ds_config.get("pipeline", {}), pipe_partitioned=False,
                                              grad_partitioned=False))
    pipe = TaskPipeline(model, get_task(task), pipeline_topology(tensor_parallel, pipeline_parallel))
    engine, *_ = deepspeed.initialize(model=pipe, config=ds_config, lr_scheduler=lr_scheduler,
                                      model_parameters=stage_aligned_groups(
                                          run_param_groups(pipe, optim, model.cfg.depth, heads)))
    return engine


def stage_aligned_groups(groups: list[dict]) -> list[dict]:
    """`groups` with as many groups as the rank with the most (its stage has the heads' own lr, or
    more layer-decay levels): the largest groups are split into parts with the same settings.
    DeepSpeed's ZeRO optimizer all-reduces each group's gradient norm over every stage and drops
    empty groups, so unequal counts hang its step; a split changes nothing else (AdamW is
    elementwise, and the global norm sums over groups)."""
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, len(groups))
    out = list(groups)
    while len(out) < max(counts):
        i = max(range(len(out)), key=lambda j: len(out[j]["params"]))
        params = out[i]["params"]
        if len(params) < 2:
            raise ValueError(f"pipeline stage of rank {dist.get_rank()}: {sum(len(g['params']) for g in out)} "
                             f"trainable tensors, fewer than the {max(counts)} AdamW groups of another stage; "
                             "use fewer pipeline stages")
        half = len(params) // 2
        out[i:i + 1] = [{**out[i], "params": params[:half]},
                        {**out[i], "params": params[half:], "name": f"{out[i]['name']}#{len(out)}"}]
    return out


class PipelineStep:
    """Steps of the engine's task over micro-batches in the data loader's keys (on the device).
    weights, seed, mlm_slots: as TaskObjective's (StepContext)."""

    def __init__(self, engine, weights: LossWeights = LossWeights(), seed: int = 0, mlm_slots: int | None = None):
        self.engine, self.pipe, self.task = engine, engine.module, engine.module.task
        self.weights, self.seed, self.mlm_slots = weights, seed, mlm_slots
        self.first, self.last = engine.is_first_stage(), engine.is_last_stage()
        self.dtype = model_dtype(engine)

    def run(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        """One optimizer step; -> the loss and its terms (averaged over micro-batches and DP ranks)."""
        loss = self.engine.train_batch(iter(self._data(micro_batches, step, "train")))
        terms = self.engine.agg_additional_losses or {}
        return {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}

    def evaluate(self, micro_batches: list[dict], step: int) -> dict[str, torch.Tensor]:
        """Held-out: {"loss" and each term: the sum over the micro-batches} on every rank."""
        out = self._eval(self._data(micro_batches, step, "eval"))
        sums = torch.stack(out).sum(0).cpu() if self.last else None
        return dict(zip(("loss", *self.task.terms), self._from_last_stage(sums)))

    def heldout_parts(self, micro_batches: list[dict], step: int) -> list[dict]:
        """Held-out: the task's Task.heldout_batch of each micro-batch (on the last stage, over the
        passes of Task.heldout_inputs) on every rank, on this rank's device, for Task.heldout_reduce."""
        specs, items = self.task.heldout_inputs(self._cast(micro_batches))
        self._use("metrics", self._context(step), specs)
        self._eval([(first_stage_inputs(inputs) if self.first else None, mb) for inputs, mb in items])
        parts = [{k: v.cpu() for k, v in part.items()} for part in self.pipe.metric_parts] if self.last else None
        return [{k: v.to(self.engine.device) for k, v in part.items()} for part in self._from_last_stage(parts)]

    def _cast(self, micro_batches: list[dict]) -> list[dict]:
        # the pipeline engine feeds inputs as they come: images in the weights' dtype (bf16 runs)
        return [dict(mb, image=mb["image"].to(self.dtype)) if "image" in mb else mb for mb in micro_batches]

    def _context(self, step: int) -> StepContext:
        return StepContext(self.weights, state.dp_group(), self.seed, step, self.mlm_slots)

    def _data(self, micro_batches: list[dict], step: int, mode: str) -> list:
        """(first stage inputs, the micro-batch for the loss) of each micro-batch."""
        batches, ctx = self._cast(micro_batches), self._context(step)
        probes = self._probe(batches, ctx) if self.task.probe_passes else [None] * len(batches)
        self._use(mode, ctx)
        return [(first_stage_inputs(self.task.inputs(mb, ctx, probe)) if self.first else None, mb)
                for mb, probe in zip(batches, probes)]

    def _probe(self, batches: list[dict], ctx) -> list:
        self._use("probe", ctx)
        data = [(first_stage_inputs([self.task.inputs(mb, ctx)[i] for i in self.task.probe_passes])
                 if self.first else None, mb) for mb in batches]
        out = self._eval(data)
        probes = self._from_last_stage([[t.cpu() for t in probe] for probe in out] if self.last else None)
        return [[t.to(self.engine.device) for t in probe] for probe in probes]

    def _eval(self, data: list) -> list:
        # eval_batch adds to the previous train_batch's scalar total_loss (DeepSpeed 0.19.8 resets it
        # only in train_batch), which fails for the tensors these passes return
        self.engine.total_loss = None
        return self.engine.eval_batch(iter(data), compute_loss=True, reduce_output=None, bcast_loss=False,
                                      num_micro_batches=len(data))

    def _use(self, mode: str, ctx, specs: tuple = ()) -> None:
        self.pipe.use(mode, ctx, specs)
        self.engine.reset_activation_shape()  # the tuple between stages changes with the mode

    def _from_last_stage(self, value):
        """`value` of the last stage on every stage of this pipeline."""
        grid, box = self.engine.grid, [value]
        if grid.pipe_parallel_size > 1:
            dist.broadcast_object_list(box, src=grid.stage_to_global(grid.pipe_parallel_size - 1),
                                       group=grid.get_pipe_parallel_group())
        return box[0]
