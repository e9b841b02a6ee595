"""The pretraining loop with the model cut into DeepSpeed pipeline stages (parallel.pp > 1).

    PipelineTrainer(cfg, resolved, tracker=tracker).run()

The loop, logging, checkpoint protocol, resume and metrics file are Trainer's; what differs:
  - the model: VLMo is built whole from the seed or `init` as in Trainer (the same initial
    weights at any layout), then each rank keeps only its stage's layers (parallel/pipeline_layers.py, training/pipeline_*.py);
  - a step: `grad_accum` micro-batches go through PipelineStep as one pipeline schedule. In stage
    vl the ITC logits and the hard-negative pool are per micro-batch (the non-pipeline path's with
    grad_accum=1);
  - tensors no pipeline layer holds in this stage (stage vl: the MIM head; stage mim: the text
    embeddings and the VL heads...) are kept as initialised by rank 0 and stored in the
    checkpoint's client_state under OUTSIDE_KEY, so that the export and `to-plain` give every
    tensor of the preset;
  - export: the layers are gathered across TP ranks and stages (pipeline_weights) to rank 0.
Evaluation during training is not supported (validation.py refuses eval_every with pp > 1).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.optim.lr_scheduler import LambdaLR

from vlmo_large.checkpoint.pipeline_reader import OUTSIDE_KEY  # client_state: {plain name: tensor} no stage holds
from vlmo_large.checkpoint.plain import write_export
from vlmo_large.data.masking import max_masked_tokens
from vlmo_large.parallel import state
from vlmo_large.training.pipeline_engine import PipelineStep, build_pipeline_engine
from vlmo_large.training.pipeline_weights import gather_plain_state_dict, named_plain_parameters
from vlmo_large.parallel.sharding import gather_full_state_dict
from vlmo_large.training.engine import model_dtype, with_torch_fused_adamw
from vlmo_large.training.optimization import WarmupDecay
from vlmo_large.training.trainer import Trainer, to_device



def pipeline_ds_config(ds_config: dict) -> dict:
    """As training/engine.py's build_engine: torch's fused AdamW (no FusedAdam JIT build), so both
    paths run the same optimizer."""
    return with_torch_fused_adamw(ds_config)


def held_names(pipe) -> set[str]:
    """Plain names of the tensors that some stage of this pipeline holds (collective over the stages)."""
    mine = {name for name, _ in named_plain_parameters(pipe)}
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, mine, group=parallel_state.get_pipeline_model_parallel_group())
    return set().union(*parts)


class PipelineTrainer(Trainer):
    def setup(self) -> None:
        cfg, resolved = self.cfg, self.resolved
        state.ensure_initialized(cfg.parallel.tp, cfg.parallel.pp)
        self.rank = dist.get_rank()
        self.build_model()
        full = gather_full_state_dict(self.model, state.tp_group())  # the plain tensors to cut into stages
        self.model = None  # the pipeline's layers replace it
        schedule = WarmupDecay(cfg.schedule.warmup, cfg.schedule.steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio)
        self.engine = build_pipeline_engine(
            resolved.model, cfg.stage, pipeline_ds_config(resolved.ds_config), cfg.parallel.tp, cfg.parallel.pp,
            weights=full, weight_decay=cfg.optim.weight_decay, decay_rule=cfg.optim.decay_rule,
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: schedule(step)))
        self.engine.module.loss_fn.weights = cfg.loss
        # the MLM head's fixed slot count, as TaskObjective sets it (no host sync per step)
        self.engine.module.loss_fn.mlm_slots = max_masked_tokens(resolved.model.max_text_len, cfg.data.mlm_prob)
        self.runner = PipelineStep(self.engine, seed=cfg.seed,
                                   itm_skip_identical_text=cfg.loss.itm_skip_identical_text)
        held = held_names(self.engine.module)
        dtype = model_dtype(self.engine)
        self.outside = {k: v.to(dtype) for k, v in full.items() if k not in held} if self.rank == 0 else {}
        del full
        self.progress_note.append(f"pipeline: {cfg.parallel.pp} stages x TP {cfg.parallel.tp} x DP "
                                  f"{state.dp_size()}; this rank runs layers {self._layer_range()}"
                                  + (f"; kept as initialised (no stage holds them): {len(self.outside)} tensors"
                                     if self.outside else ""))
        self.restore()

    def _layer_range(self) -> str:
        module = self.engine.module
        return f"{module._local_start}..{module._local_stop - 1} of {module._num_layers}"

    def train_step(self, batches) -> dict:
        micro = [to_device(next(batches), self.engine.device, torch.float32)
                 for _ in range(self.resolved.grad_accum)]
        metrics = self.runner.run(micro, self.step)  # already averaged over micro-batches and DP ranks
        return dict(sorted(metrics.items()))  # Trainer's order in the progress lines

    def save(self, extra=None) -> None:
        super().save({OUTSIDE_KEY: self.outside, **(extra or {})})

    def export(self, out_dir: str) -> None:
        """Collective: model.safetensors + config.json of every tensor (checkpoint.plain.write_export),
        written by rank 0."""
        full = gather_plain_state_dict(self.engine.module)
        if self.rank == 0:
            full.update(self.outside)
            write_export(out_dir, full, self.resolved.model)
        dist.barrier()

    def _evaluate(self, progress) -> None:
        raise RuntimeError("evaluation during training is not supported with pipeline parallelism")
