"""One stage-3 (vl) optimizer step through the trainer's DeepSpeed engine at a TP x DP x ZeRO layout.

Under torchrun: argv = weights.safetensors out_dir tp:zero[,tp:zero...] (dp = world / tp), the
layouts in turn in one session (one start-up for all). Every layout starts from the same plain
weights and the same global batch (`global_batch`, split by data-parallel rank with `local_batch`);
rank 0 saves to out_dir/tp<tp>_zero<zero>.pt:
    {"ranks": [{"dp": r, "tp": t, "losses": {...}, "negatives": [image_for_text, text_for_image]}],
     "weights": plain state dict after the step (TP-merged, ZeRO-3-gathered)}
The single-process reference (test_layouts_vs_single_process.py) replays the negatives drawn here.
"""
import os
import sys
from contextlib import contextmanager, nullcontext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

GLOBAL_BATCH = 8
MLM_PER_SAMPLE = 5  # the same count in every sample: the mean of per-rank MLM token means is then
#                     the global token mean, i.e. what one process computes on the concatenated batch
SEED = 0
TERMS = ("loss", "itc", "itc_vl", "itm", "mlm")
# Adam's first step moves by lr * g / (|g| + eps): near-zero gradients carry rounding noise of the
# reduction order (TP, DP) which eps 1e-8 would magnify into visible weight differences. The clip
# (the gradient norm is ~7) keeps that noise well under eps (worst tensor at ~13% of the tolerance;
# 0.05 gives ~58%, 1.0 fails) while the step stays sensitive to the clip coefficient: a 1% error in
# the global gradient norm across TP and DP moves most tensors past the tolerance.
OPTIM = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "grad_clip": 0.01}


def global_batch(cfg) -> dict:
    """Deterministic image-text batch in the data loader's keys; padded texts of varied length."""
    gen = torch.Generator().manual_seed(21)
    B, T = GLOBAL_BATCH, cfg.max_text_len
    ids = torch.randint(5, cfg.vocab_size, (B, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * mask
    picked = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        picked[b, 1 + torch.randperm(int(lengths[b]) - 1, generator=gen)[:MLM_PER_SAMPLE]] = True
    return {"image": torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=gen),
            "text_ids": ids, "text_mask": mask,
            "mlm_ids": torch.where(picked, torch.full_like(ids, 4), ids),
            "mlm_labels": torch.where(picked, ids, torch.full_like(ids, -100))}


def local_batch(batch: dict, rank: int, world: int) -> dict:
    rows = GLOBAL_BATCH // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def run_config(tp: int, dp: int):
    from vlmo_large.training.run_config import RunConfig, build_dataclass

    return build_dataclass(RunConfig, {
        "preset": "tiny", "stage": "vl", "seed": SEED, "data": {"source": "random"},
        "parallel": {"tp": tp}, "batch": {"micro": GLOBAL_BATCH // dp, "grad_accum": 1},
        "optim": dict(OPTIM), "schedule": {"steps": 10, "warmup": 0}, "checkpoint": {"every": 0}})


def ds_config(zero: int) -> dict:
    # persistence threshold 0: ZeRO-3 partitions every parameter, the tiny ones included
    return {"zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": False}}


@contextmanager
def recorded_negatives():
    """Wrap the ITM sampler so that every draw of this rank is kept, in call order (-> that list)."""
    from vlmo_large.tasks import losses

    drawn, sample = [], losses.sample_hard_negatives

    def recording(*args, **kwargs):
        out = sample(*args, **kwargs)
        drawn.append(out.detach().clone())
        return out

    losses.sample_hard_negatives = recording  # itm_pairs looks it up there
    try:
        yield drawn
    finally:
        losses.sample_hard_negatives = sample  # the next layout records its own draws


def main(weights_path: str, out_dir: str, layouts: str) -> None:
    from megatron.core import parallel_state

    from vlmo_large.parallel import state

    for layout in layouts.split(","):
        tp, zero = map(int, layout.split(":"))
        step_at_layout(weights_path, os.path.join(out_dir, f"tp{tp}_zero{zero}.pt"), tp, zero)
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    state.destroy()


def step_at_layout(weights_path: str, out_path: str, tp: int, zero: int) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    from vlmo_large.model import build_model
    from vlmo_large.parallel import state
    from vlmo_large.parallel.sharding import gather_full_state_dict, local_state_dict
    from vlmo_large.training.engine import build_engine, is_zero3
    from vlmo_large.training.freezing import apply_stage_freezing
    from vlmo_large.training.objectives import TaskObjective
    from vlmo_large.training.validation import resolve_run

    state.ensure_initialized(tp, 1)
    dp = dist.get_world_size() // tp
    cfg = run_config(tp, dp)
    resolved = resolve_run(cfg, ds_config(zero), dist.get_world_size())
    torch.manual_seed(0)
    model = build_model(resolved.model, tp_group=state.tp_group()).train()
    model.load_state_dict(local_state_dict(model, load_file(weights_path), state.tp_rank(), state.tp_size()))
    apply_stage_freezing(model, "vl")
    objective = TaskObjective(model, "vl", group=state.dp_group(), seed=SEED)
    engine = build_engine(objective, resolved, cfg)
    assert engine.zero_optimization_stage() == zero
    if zero == 0 and dp == 1:  # nothing to average: the step below runs without DeepSpeed's all-reduce
        assert not engine.enable_backward_allreduce

    with recorded_negatives() as drawn:
        out = engine(local_batch(global_batch(model.cfg), state.dp_rank(), dp), 0)
    engine.backward(out["loss"])
    engine.step()

    mine = {"dp": state.dp_rank(), "tp": state.tp_rank(), "losses": {k: out[k].item() for k in TERMS},
            "negatives": drawn}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if is_zero3(engine) else nullcontext():
        after = gather_full_state_dict(model, state.tp_group())
    if dist.get_rank() == 0:
        torch.save({"ranks": ranks, "weights": after}, out_path)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
