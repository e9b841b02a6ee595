"""The training loop with VLMo cut into DeepSpeed pipeline stages (parallel.pp > 1).

    PipelineTrainer(cfg, resolved, tracker=tracker).run()

The loop, logging, checkpoint protocol, resume, metrics file and model build (seed or `init`,
freezing, parallelize) are Trainer's; what differs:
  - the model: only this rank's stage gets storage and its initial values (parallel/stage_build.py,
    the same numbers as the whole build); the other stages' tensors stay on the meta device until
    the pipeline (training/pipeline_module.py) drops them. DeepSpeed's pipeline engine then names
    every tensor of its checkpoints by its VLMo name;
  - a step: `grad_accum` micro-batches go through PipelineStep as one pipeline schedule (stage vl:
    the ITC logits and the hard-negative pool are per micro-batch, as one process with grad_accum=1);
  - held-out evaluation (training/heldout_evaluation.py): the loss terms through the pipeline;
  - export: the stages are gathered to rank 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.optim.lr_scheduler import LambdaLR

from vlmo_large.checkpoint.plain import write_export
from vlmo_large.data.masking import max_masked_tokens
from vlmo_large.parallel import state
from vlmo_large.parallel.stage_build import build_stage
from vlmo_large.training.engine import with_torch_fused_adamw
from vlmo_large.training.optimization import WarmupDecay
from vlmo_large.training.pipeline_engine import PipelineStep, build_pipeline_engine
from vlmo_large.training.pipeline_module import gather_plain_state_dict
from vlmo_large.training.trainer import Trainer, to_device


class PipelineTrainer(Trainer):
    def setup(self) -> None:
        cfg, resolved = self.cfg, self.resolved
        state.ensure_initialized(cfg.parallel.tp, cfg.parallel.pp)
        self.rank = dist.get_rank()
        self.build_model()
        schedule = WarmupDecay(cfg.schedule.warmup, cfg.schedule.steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio)
        # torch's fused AdamW as training/engine.py's build_engine (no FusedAdam JIT build)
        self.engine = build_pipeline_engine(
            self.model, cfg.stage, with_torch_fused_adamw(resolved.ds_config), cfg.parallel.tp, cfg.parallel.pp,
            cfg.optim, self.head_names,
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: schedule(step)))
        # the MLM head's fixed slot count, as TaskObjective sets it (no host sync per step)
        self.runner = PipelineStep(self.engine, cfg.loss, cfg.seed,
                                   max_masked_tokens(resolved.model.max_text_len, cfg.data.mlm_prob))
        module = self.engine.module
        self.progress_note.append(f"pipeline: {cfg.parallel.pp} stages x TP {cfg.parallel.tp} x DP "
                                  f"{state.dp_size()}; this rank runs layers {module._local_start}.."
                                  f"{module._local_stop - 1} of {module._num_layers}")
        self.restore()

    def new_model(self, heads: dict):
        stage = parallel_state.get_pipeline_model_parallel_rank()  # = DeepSpeed's (pipeline_topology checks)
        return build_stage(self.resolved.model, stage, self.cfg.parallel.pp, tp_group=state.tp_group(), heads=heads)

    def train_step(self, batches) -> dict:
        micro = [to_device(next(batches), self.engine.device, torch.float32)
                 for _ in range(self.resolved.grad_accum)]
        metrics = self.runner.run(micro, self.step)  # already averaged over micro-batches and DP ranks
        return dict(sorted(metrics.items()))  # Trainer's order in the progress lines

    def export(self, out_dir: str) -> None:
        """Collective: model.safetensors + config.json of every tensor (checkpoint.plain.write_export),
        written by rank 0."""
        full = gather_plain_state_dict(self.engine.module)
        if self.rank == 0:
            write_export(out_dir, full, self.resolved.model, self.export_extras())
        dist.barrier()

