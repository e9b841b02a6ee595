"""DeepSpeed's pipeline engine for VLMo, and one pretraining step of stage 1, 2 or 3 through it.

A stage-3 step (M micro-batches of B pairs on each data-parallel rank):
  1. dual pass: `engine.eval_batch` in "dual" mode, no grad: image and text streams only, ITC
     features of each micro-batch come out of the last stage;
  2. the last stage gathers them over data parallel, samples the hard negatives
     (pipeline_negatives.py) and broadcasts their indices [M, 2, B] along its pipeline;
  3. the first stage gathers the raw images, ids and masks over data parallel and builds the fused
     pairs (3B ITM + B MLM);
  4. training pass: `engine.train_batch` in "itc_itm_mlm" mode (ITC, ITM, MLM; ZeRO-1 step).
Cost of step 1: one extra forward of the image and text streams, without backward, VL branch or
fused pairs. Per sample at 224 px / 40 tokens the training pass runs 197 + 40 image/text tokens,
~30 VL-branch tokens and 4 x 237 fused tokens per layer forward, and about twice that backward,
so the extra pass adds ~237 / (3 x 1215) ~ 7% compute, plus one pipeline fill and drain.
"""
from __future__ import annotations

import importlib

import deepspeed
import torch
import torch.distributed as dist

from vlmo_large.config import ModelConfig
from vlmo_large.parallel import state
from vlmo_large.parallel.layout import validate_layout
from vlmo_large.parallel.pipeline_losses import patch_pixel_targets
from vlmo_large.parallel.pipeline_module import MoMEPipeline
from vlmo_large.parallel.pipeline_negatives import fused_inputs, sample_hard_negatives
from vlmo_large.parallel.pipeline_topology import pipeline_topology
from vlmo_large.parallel.pipeline_weights import freeze_for_stage, load_plain_state_dict


def _init_deepspeed_comm() -> None:
    """deepspeed.comm over the existing process group; on the CPU skip its shared-memory op, which
    JIT-compiles for ~50 s and only serves inference all-reduce."""
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_pipeline_engine(cfg: ModelConfig, stage: int, ds_config: dict, tensor_parallel: int,
                          pipeline_parallel: int, weights: dict | None = None,
                          partition_method: str = "parameters"):
    """Validate the layout, create the process groups, build this rank's stage and its engine.

    `weights`: a plain VLMo state dict (full tensors) to start from; otherwise layers initialise
    themselves as VLMo does.
    """
    state.init_distributed()
    world = dist.get_world_size()
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    validate_layout(cfg, tensor_parallel, pipeline_parallel, world // (tensor_parallel * pipeline_parallel),
                    zero, world)
    _init_deepspeed_comm()
    pipe = MoMEPipeline(cfg, stage, pipeline_topology(tensor_parallel, pipeline_parallel), partition_method)
    if weights is not None:
        load_plain_state_dict(pipe, weights)
    freeze_for_stage(pipe, stage)
    engine, *_ = deepspeed.initialize(model=pipe, config=ds_config,
                                      model_parameters=[p for p in pipe.parameters() if p.requires_grad])
    return engine


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces)


class PipelineStep:
    """Runs pretraining steps on a pipeline engine. Micro-batches are dicts with the data loader's
    keys (image, text_ids, text_mask, mlm_ids, mlm_labels, mim_mask[, mim_target])."""

    def __init__(self, engine, seed: int = 0):
        self.engine, self.pipe = engine, engine.module
        self.generator = torch.Generator().manual_seed(seed + 1_000_003 * state.dp_rank())
        self.first, self.last = engine.is_first_stage(), engine.is_last_stage()

    def _mode(self, mode: str) -> None:
        self.pipe.set_mode(mode)
        self.engine.reset_activation_shape()  # the tuple between stages changes with the mode

    def _train(self, mode: str, data: list) -> dict[str, float]:
        self._mode(mode)
        loss = self.engine.train_batch(iter(data))
        terms = self.engine.agg_additional_losses or {}
        return {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}

    def mim(self, micro_batches: list[dict]) -> dict[str, float]:
        patch = self.pipe.cfg.patch_size
        data = []
        for mb in micro_batches:
            mask = mb["mim_mask"].flatten(1).long()
            target = mb.get("mim_target")
            target = patch_pixel_targets(mb["image"], patch) if target is None else target
            data.append(((mb["image"], mask), (mask, target)))
        return self._train("mim", data)

    def text_mlm(self, micro_batches: list[dict]) -> dict[str, float]:
        return self._train("text_mlm", [((mb["mlm_ids"], mb["text_mask"]), mb["mlm_labels"])
                                        for mb in micro_batches])

    def itc_itm_mlm(self, micro_batches: list[dict]) -> dict[str, float]:
        negatives = self._hard_negatives(micro_batches)
        data = []
        for mb, (neg_image, neg_text) in zip(micro_batches, negatives):
            images, ids, mask = mb["image"], mb["text_ids"], mb["text_mask"]
            inputs = None
            if self.first:
                group = state.dp_group()
                pair_ids, pair_mask, pair_images, _ = fused_inputs(
                    images, ids, mask, mb["mlm_ids"], _gather(images, group), _gather(ids, group),
                    _gather(mask, group), neg_image, neg_text)
                inputs = (images, ids, mask, pair_ids, pair_mask, pair_images)
            itm_labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
            data.append((inputs, (mb["mlm_labels"], itm_labels)))
        return self._train("itc_itm_mlm", data)

    def _hard_negatives(self, micro_batches: list[dict]) -> torch.Tensor:
        """[M, 2, B] global indices: a negative image per text, a negative text per image."""
        self._mode("dual")
        data = [((mb["image"], mb["text_ids"], mb["text_mask"]), torch.zeros(())) for mb in micro_batches]
        features = self.engine.eval_batch(iter(data), compute_loss=True, reduce_output=None, bcast_loss=False,
                                          num_micro_batches=len(data))
        B = len(micro_batches[0]["text_ids"])
        negatives = torch.zeros(len(micro_batches), 2, B, dtype=torch.long)
        if self.last:
            group = state.dp_group()
            for m, (image, text, scale) in enumerate(features):
                negatives[m] = torch.stack(sample_hard_negatives(
                    image, text, scale, _gather(image, group), _gather(text, group), state.dp_rank() * B,
                    self.generator))
        grid = self.engine.grid
        if grid.pipe_parallel_size > 1:
            last = grid.stage_to_global(grid.pipe_parallel_size - 1)
            dist.broadcast(negatives, src=last, group=grid.get_pipe_parallel_group())
        return negatives
