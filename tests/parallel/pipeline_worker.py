"""Run one optimizer step of pretraining stages vl, mim and text_mlm through DeepSpeed's pipeline.

Under torchrun: argv = weights.safetensors out_dir tp pp. Every stage starts from the same plain
weights and micro-batches (`stage_batches`, also used by the single-process reference) and rank 0
saves {"heldout": {...}, "losses": {...}, "weights": plain state dict after the step} to
out_dir/{stage}.pt; "heldout": the held-out loss terms (summed over the micro-batches) on the
starting weights, before the step; "metrics" (stage vl): the task's held-out metrics
(Task.heldout_reduce of PipelineStep.heldout_parts) on the same weights and micro-batches. Then the
held-out terms of a fine-tuning task (FINE_TUNING) go to out_dir/nlvr2.pt, and the held-out metrics
of each METRIC_TASKS task to out_dir/{task}_metrics.pt.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

from vlmo_large.config import get_preset  # noqa: E402
from vlmo_large.training.run_config import OptimConfig  # noqa: E402

MICRO_BATCH, MICRO_BATCHES = 3, 2
# eps above the rounding noise of near-zero gradients (~1e-10 after clipping): Adam's first step
# divides g by |g| + eps, which would magnify that noise to a visible weight difference at 1e-8
OPTIMIZER = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6}
WEIGHT_DECAY = 0.01
STAGES = ("vl", "mim", "text_mlm")
FINE_TUNING, FINE_TUNING_SEED = "nlvr2", 5  # two fused passes, the right image's modality row, its own head
METRIC_TASKS, VQA_ANSWERS = ("nlvr2", "vqa"), 7  # vqa: a 7-answer classifier that knows its strings
CLIP = 0.05  # small enough to clip in every stage: tests the global grad norm across stages and TP


def ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": MICRO_BATCHES,
            "optimizer": {"type": "AdamW", "params": dict(OPTIMIZER, weight_decay=WEIGHT_DECAY, torch_adam=True)},
            "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP, "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False}


def stage_batches(cfg, stage: str) -> list[dict]:
    """Deterministic micro-batches in the data loader's keys."""
    gen = torch.Generator().manual_seed(100 + STAGES.index(stage))
    out = []
    for _ in range(MICRO_BATCHES):
        B, T = MICRO_BATCH, cfg.max_text_len
        ids = torch.randint(5, cfg.vocab_size, (B, T), generator=gen)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, T // 2:] = 0
        masked = torch.rand(B, T, generator=gen) < 0.3
        masked[:, 0] = True
        mb = {"image": torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=gen),
              "text_ids": ids, "text_mask": mask,
              "mlm_ids": torch.where(masked, torch.full_like(ids, 3), ids),
              "mlm_labels": torch.where(masked & (mask > 0), ids, torch.full_like(ids, -100)),
              "mim_mask": torch.rand(B, cfg.num_patches, generator=gen) < 0.4}
        out.append(mb)
    return out


def main(weights_path: str, out_dir: str, tp: int, pp: int) -> None:
    from safetensors.torch import load_file

    from vlmo_large.model import build_model
    from vlmo_large.parallel import state
    from vlmo_large.parallel.sharding import local_state_dict
    from vlmo_large.training.freezing import apply_stage_freezing
    from vlmo_large.training.pipeline_engine import PipelineStep, build_pipeline_engine
    from vlmo_large.training.pipeline_module import gather_plain_state_dict

    cfg = get_preset("tiny")
    weights = load_file(weights_path)
    state.ensure_initialized(tp, pp)
    for stage in STAGES:
        torch.manual_seed(0)
        model = build_model(cfg, tp_group=state.tp_group())
        model.load_state_dict(local_state_dict(model, weights, state.tp_rank(), tp))
        apply_stage_freezing(model, stage)
        engine = build_pipeline_engine(model, stage, ds_config(), tp, pp, OptimConfig(weight_decay=WEIGHT_DECAY))
        heldout = PipelineStep(engine).evaluate(stage_batches(cfg, stage), step=0)
        metrics = pipeline_metrics(engine, stage_batches(cfg, stage)) if stage == "vl" else None
        losses = PipelineStep(engine).run(stage_batches(cfg, stage), step=0)
        after = gather_plain_state_dict(engine.module)
        if torch.distributed.get_rank() == 0:
            torch.save({"heldout": heldout, "metrics": metrics, "losses": losses, "weights": after},
                       os.path.join(out_dir, f"{stage}.pt"))
    for name in METRIC_TASKS:
        engine = fine_tuning_engine(name, tp, pp)
        batches = fine_tuning_batches(engine.module.task)
        metrics = pipeline_metrics(engine, batches)
        heldout = PipelineStep(engine).evaluate(batches, step=0) if name == FINE_TUNING else None
        if torch.distributed.get_rank() == 0:
            torch.save(metrics, os.path.join(out_dir, f"{name}_metrics.pt"))
            if heldout is not None:
                torch.save(heldout, os.path.join(out_dir, f"{FINE_TUNING}.pt"))
    state.destroy()


def pipeline_metrics(engine, batches: list[dict]) -> dict:
    """The engine's task's held-out metrics as held-out evaluation computes them at PP."""
    from vlmo_large.training.pipeline_engine import PipelineStep
    task = engine.module.task
    return task.heldout_reduce(PipelineStep(engine).heldout_parts(batches, step=0))


def fine_tuning_model(build, task, **kwargs):
    """The fine-tuning task's model (its heads and model overrides), initialised from FINE_TUNING_SEED."""
    cfg = get_preset("tiny", **getattr(task, "model_overrides", {}))
    return build(cfg, heads=fine_tuning_heads(task, cfg), seed=FINE_TUNING_SEED, **kwargs)


def fine_tuning_heads(task, cfg) -> dict:
    """vqa: VQA_ANSWERS answers named as random batches name them ("0", "1", ...)."""
    if task.name != "vqa":
        return task.heads(cfg, None)
    from vlmo_large.model.heads import vqa_classifier
    return {"vqa_classifier": vqa_classifier(cfg.embed_dim, VQA_ANSWERS, tuple(map(str, range(VQA_ANSWERS))))}


def fine_tuning_batches(task) -> list[dict]:
    from vlmo_large.training.random_batches import random_batch
    cfg = get_preset("tiny", **getattr(task, "model_overrides", {}))
    return [random_batch(task.data_kind, cfg, MICRO_BATCH, torch.Generator().manual_seed(i), num_answers=VQA_ANSWERS)
            for i in range(MICRO_BATCHES)]


def fine_tuning_engine(name: str, tp: int, pp: int):
    """The pipeline engine of fine-tuning task `name`, a task written once for one process; each
    rank builds only its stage."""
    from megatron.core import parallel_state

    from vlmo_large.parallel import state
    from vlmo_large.parallel.stage_build import build_stage
    from vlmo_large.tasks.registry import get_task
    from vlmo_large.training.pipeline_engine import build_pipeline_engine

    task = get_task(name)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = fine_tuning_model(lambda cfg, **kw: build_stage(cfg, stage, pp, tp_group=state.tp_group(), **kw), task)
    return build_pipeline_engine(model, task, ds_config(), tp, pp, OptimConfig())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
