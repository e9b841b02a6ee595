"""DeepSpeed's pipeline engine for VLMo, and one pretraining step of any stage through it.

A stage-3 ("vl") step, M micro-batches of B pairs on each data-parallel rank:
  1. dual pass: `engine.eval_batch` in "dual" mode, no grad: the image and text streams only; the
     last stage turns their CLS states into the global ITC logits (tasks/losses.py contrastive_loss);
  2. those logits [M, 2, B, B x DP] are broadcast along each pipeline to its first stage;
  3. the first stage draws the hard negatives and builds the 3B ITM pairs with tasks/losses.py itm_pairs
     (all-gathering the raw images, ids and masks over data parallel), seeded as
     the one-process step seeds it (StepContext), so both paths draw the same negatives;
  4. training pass: `engine.train_batch` in "vl" mode (ITC, ITM, MLM; ZeRO-1 step).
Cost of step 1: one extra forward of the image and text streams, without backward, VL branch or
fused pairs. Per sample at 224 px / 40 tokens the training pass runs 197 + 40 image/text tokens,
~30 VL-branch tokens and 4 x 237 fused tokens per layer forward, and about twice that backward,
so the extra pass adds ~237 / (3 x 1215) ~ 7% compute, plus one pipeline fill and drain.
The logits come from eval mode (no drop path), where the single-process path takes them from its
training forward: the same numbers when drop path is 0.
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from vlmo_large.config import ModelConfig
from vlmo_large.parallel import state
from vlmo_large.parallel.layout import validate_layout
from vlmo_large.training.pipeline_module import MoMEPipeline
from vlmo_large.parallel.pipeline_topology import pipeline_topology
from vlmo_large.training.pipeline_weights import freeze_for_stage, load_plain_state_dict, param_groups
from vlmo_large.training.engine import model_dtype, prepare_deepspeed
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.losses import itm_labels as make_itm_labels
from vlmo_large.tasks.losses import itm_pairs, normalized_pixel_targets


def build_pipeline_engine(cfg: ModelConfig, stage: str, ds_config: dict, tensor_parallel: int,
                          pipeline_parallel: int, weights: dict | None = None, weight_decay: float = 0.01,
                          decay_rule: str = "reference", lr_scheduler=None):
    """Validate the layout, create the process groups, build this rank's stage and its engine.

    `weights`: a plain VLMo state dict (full tensors) to start from; otherwise layers initialise
    themselves as VLMo does. AdamW groups and freezing follow training/ (by VLMo names).
    """
    state.init_distributed()
    world = dist.get_world_size()
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    validate_layout(cfg, tensor_parallel, pipeline_parallel, world // (tensor_parallel * pipeline_parallel),
                    zero, world)
    prepare_deepspeed(dist.get_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # DeepSpeed's TP "pipe partitioning" splits only the first tensor of the tuple and assumes the
    # others need no gradient; every stream here needs one, so whole tensors are sent.
    ds_config = dict(ds_config, pipeline=dict(ds_config.get("pipeline", {}), pipe_partitioned=False,
                                              grad_partitioned=False))
    pipe = MoMEPipeline(cfg, stage, pipeline_topology(tensor_parallel, pipeline_parallel))
    if weights is not None:
        load_plain_state_dict(pipe, weights)
    freeze_for_stage(pipe, stage)
    engine, *_ = deepspeed.initialize(model=pipe, config=ds_config, lr_scheduler=lr_scheduler,
                                      model_parameters=param_groups(pipe, weight_decay, decay_rule))
    return engine


class PipelineStep:
    """Runs pretraining steps on a pipeline engine. Micro-batches are dicts with the data loader's
    keys (image, text_ids, text_mask, mlm_ids, mlm_labels, mim_mask [B, N][, mim_targets])."""

    def __init__(self, engine, seed: int = 0, itm_skip_identical_text: bool = False):
        self.engine, self.pipe, self.seed = engine, engine.module, seed
        self.itm_skip_identical_text = itm_skip_identical_text
        self.first, self.last = engine.is_first_stage(), engine.is_last_stage()
        self.dtype = model_dtype(engine)

    def run(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        """One optimizer step of the pipeline's stage; -> the loss and its terms (averaged)."""
        # the pipeline engine feeds inputs as they come: images in the weights' dtype (bf16 runs)
        micro_batches = [dict(mb, image=mb["image"].to(self.dtype)) if "image" in mb else mb for mb in micro_batches]
        return {"mim": self._mim, "text_mlm": self._text_mlm, "vl": self._vl}[self.pipe.stage](micro_batches, step)

    def _mode(self, mode: str) -> None:
        self.pipe.set_mode(mode)
        self.engine.reset_activation_shape()  # the tuple between stages changes with the mode

    def _train(self, mode: str, data: list) -> dict[str, float]:
        self._mode(mode)
        loss = self.engine.train_batch(iter(data))
        terms = self.engine.agg_additional_losses or {}
        return {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}

    def _mim(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        data = []
        for mb in micro_batches:
            mask = mb["mim_mask"].long()
            target = mb.get("mim_targets")
            if target is None:
                target = normalized_pixel_targets(mb["image"].float(), self.pipe.cfg.patch_size)
            data.append(((mb["image"], mask), (mask, target)))
        return self._train("mim", data)

    def _text_mlm(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        return self._train("text_mlm", [((mb["mlm_ids"], mb["text_mask"]), mb["mlm_labels"])
                                        for mb in micro_batches])

    def _vl(self, micro_batches: list[dict], step: int) -> dict[str, float]:
        logits = self._itc_logits(micro_batches)
        group, data = state.dp_group(), []
        for mb, (i2t, t2i) in zip(micro_batches, logits):
            B, inputs = len(mb["text_ids"]), None
            if self.first:
                # the one-process step's generator for this step and data-parallel rank
                generator = StepContext(group=group, seed=self.seed, step=step).generator(mb["image"].device)
                pairs = itm_pairs(mb, i2t, t2i, group, generator, self.itm_skip_identical_text)
                inputs = (mb["image"], mb["text_ids"], mb["text_mask"],
                          torch.cat([mb["mlm_ids"], pairs["text_ids"]]),
                          torch.cat([mb["text_mask"], pairs["text_mask"]]),
                          torch.cat([mb["image"], pairs["image"]]))
            itm_labels = make_itm_labels(B, mb["mlm_labels"].device)  # made on the device, no copy
            data.append((inputs, (mb["mlm_labels"], itm_labels)))
        return self._train("vl", data)

    def _itc_logits(self, micro_batches: list[dict]) -> torch.Tensor:
        """[M, 2, B, B x DP]: each micro-batch's i2t and t2i rows of the global ITC logits."""
        self._mode("dual")
        data = [((mb["image"], mb["text_ids"], mb["text_mask"]), torch.zeros(())) for mb in micro_batches]
        # eval_batch adds to the previous train_batch's scalar total_loss (DeepSpeed 0.19.8 resets it
        # only in train_batch), which fails for the list of logits this pass returns from step 2 on
        self.engine.total_loss = None
        out = self.engine.eval_batch(iter(data), compute_loss=True, reduce_output=None, bcast_loss=False,
                                     num_micro_batches=len(data))
        B = len(micro_batches[0]["text_ids"])
        logits = torch.zeros(len(data), 2, B, B * state.dp_size(), device=self.engine.device)  # NCCL: on the GPU
        if self.last:
            logits = torch.stack([torch.stack(pair) for pair in out]).float()
        grid = self.engine.grid
        if grid.pipe_parallel_size > 1:
            dist.broadcast(logits, src=grid.stage_to_global(grid.pipe_parallel_size - 1),
                           group=grid.get_pipe_parallel_group())
        return logits
