"""The single-process reference of one pretraining step: plain VLMo under training/'s objective,
freezing and AdamW groups, torch AdamW with gradient clipping.

Same micro-batches, seed, clipping and optimizer settings as the pipeline worker; trainable
parameters without a gradient get zeros, as DeepSpeed's ZeRO optimizer gives them.
"""
import torch
from safetensors.torch import load_file

from tests.parallel.pipeline_worker import CLIP, MICRO_BATCHES, OPTIMIZER, WEIGHT_DECAY, stage_batches
from vlmo_large.model import build_model
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.training.objectives import TaskObjective
from vlmo_large.training.optimization import param_groups


def reference_step(weights_path: str, stage: str):
    """-> (loss terms averaged over micro-batches, state dict after one optimizer step)."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    model.load_state_dict(load_file(weights_path))
    apply_stage_freezing(model, stage)
    objective = TaskObjective(model, stage, seed=0)
    sums = {}
    for mb in stage_batches(model.cfg, stage):
        out = objective(mb, step=0)
        (out["loss"] / MICRO_BATCHES).backward()
        for name, value in out.items():
            sums[name] = sums.get(name, 0.0) + value.item() / MICRO_BATCHES
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
    assert norm > CLIP, "the step should clip, so that the global gradient norm is tested too"
    torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), **OPTIMIZER).step()
    return sums, {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_heldout(weights_path: str, stage: str) -> dict:
    """Held-out evaluation's loss terms in one process (eval mode, no grad; HeldOutEvaluator) on the
    starting weights, summed over the micro-batches."""
    model = build_model("tiny").eval()
    model.load_state_dict(load_file(weights_path))
    objective = TaskObjective(model, stage, seed=0)
    sums = {}
    with torch.no_grad():
        for mb in stage_batches(model.cfg, stage):
            for name, value in objective(mb, step=0).items():
                sums[name] = sums.get(name, 0.0) + value.item()
    return sums


def reference_fine_tuning_heldout() -> dict:
    """The fine-tuning task's held-out terms in one process, from the whole build."""
    from tests.parallel.pipeline_worker import FINE_TUNING, fine_tuning_batches, fine_tuning_model
    from vlmo_large.tasks.registry import get_task

    task = get_task(FINE_TUNING)
    model = fine_tuning_model(build_model, task).eval()
    sums = {}
    with torch.no_grad():
        for mb in fine_tuning_batches(task):
            for name, value in TaskObjective(model, task)(mb).items():
                sums[name] = sums.get(name, 0.0) + value.item()
    return sums
