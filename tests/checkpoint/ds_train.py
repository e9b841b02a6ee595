"""Train the tiny model a few steps under DeepSpeed (torchrun, gloo) and save or resume.

The per-rank loss is a mean of per-sample terms, so with a fixed global batch the losses do not
depend on how samples are split over data-parallel ranks; any TP x DP x ZeRO layout gives the
same loss curve (up to reduction order). Rank 0 writes the losses as JSON.

    torchrun --nproc_per_node N ds_train.py --tp 2 --zero 3 --steps 4 --save DIR [--save-at K]
        [--bf16] [--losses FILE] [--resume-portable PATH] [--probe FILE]

--probe writes (rank 0) `probe_outputs` of the model as saved, for comparison with conversions.

    torchrun --nproc_per_node N ds_train.py --layouts tp2-z0,tp1-z3,tp1-z0-bf16 --save DIR --probe PDIR

trains and saves each layout in turn in one session (1 step each; DIR/<layout>, PDIR/<layout>.pt).
"""
import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GLOBAL_BATCH = 4


def per_sample_loss(model, ids, mask, labels, images):
    """Touches every parallel part (vocab-parallel CE, experts, relative table, heads)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    bb = model.backbone
    image, image_vl = bb.encode_image(images, vl_branch=True)
    text, text_vl = bb.encode_text(ids, mask, vl_branch=True)
    pair = bb.encode_pair(ids, mask, images)
    logits = model.mlm_head(pair[:, : ids.shape[1]]).float()
    targets = labels.clamp(min=0)
    if model.mlm_head.tp_size == 1:  # a plain process has no megatron group (build_model(tp_group=None))
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(labels.shape)
    else:
        ce = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), targets.T.contiguous()).T
    ce = (ce * (labels != -100)).sum(1) / ids.shape[1]
    itc_i, itc_t = model.itc(image[:, 0], text[:, 0])
    squares = sum(t.float().pow(2).mean((1, 2)) for t in (image, image_vl, text, text_vl, pair))
    return ce + 0.1 * squares + (itc_i * itc_t).sum(-1) * model.itc.logit_scale


def probe_batch(cfg):
    return global_batch(cfg, step=-1)


@torch.no_grad()
def probe_outputs(model) -> dict:
    """Replicated (TP-reduced) outputs on a fixed batch: per-sample loss and three feature maps."""
    ids, mask, labels, images = probe_batch(model.cfg)
    images = images.to(next(model.parameters()).dtype)
    bb = model.backbone
    return {"loss": per_sample_loss(model, ids, mask, labels, images).float(),
            "image": bb.encode_image(images).float(), "text": bb.encode_text(ids, mask).float(),
            "pair": bb.encode_pair(ids, mask, images).float()}


def copy_of_engine_model(model, zero3: bool):
    """A plain (non-DeepSpeed) model of this TP rank holding the engine's current weights, in fp32.

    ZeRO-3 releases parameters when a submodule's forward ends, so the probe, which calls
    submodules directly, runs on a copy rather than on the engine's module."""
    import deepspeed

    from vlmo_large.model import build_model
    from vlmo_large.parallel import state

    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=zero3):
        weights = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    copy = build_model(model.cfg, tp_group=state.tp_group()).eval()
    copy.load_state_dict(weights)
    return copy


class LossModule(torch.nn.Module):
    """What DeepSpeed wraps: VLMo as `model` (names `model.backbone...`, as a trainer would have)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask, labels, images):
        return per_sample_loss(self.model, ids, mask, labels, images).mean()


def global_batch(cfg, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, cfg.vocab_size, (GLOBAL_BATCH, cfg.max_text_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[1::2, 20:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    images = torch.randn(GLOBAL_BATCH, 3, cfg.image_size, cfg.image_size, generator=gen)
    return ids, mask, labels, images


def ds_config(zero: int, bf16: bool, micro: int) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    }


def build_engine(tp: int, zero: int, bf16: bool, seed: int = 0):
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    from vlmo_large.model import build_model
    from vlmo_large.parallel import state

    state.ensure_initialized(tensor_parallel=tp)
    torch.manual_seed(seed)
    model = build_model("tiny", tp_group=state.tp_group()).train()
    wrapped = LossModule(model)
    micro = GLOBAL_BATCH // state.dp_size()
    engine, *_ = deepspeed.initialize(model=wrapped, model_parameters=wrapped.parameters(),
                                      config=ds_config(zero, bf16, micro), mpu=state.DeepSpeedMPU())
    return engine, model


def train_step(engine, cfg, step: int) -> float:
    from vlmo_large.parallel import state

    micro = GLOBAL_BATCH // state.dp_size()
    lo = state.dp_rank() * micro
    batch = [t[lo:lo + micro] for t in global_batch(cfg, step)]
    if engine.bfloat16_enabled():
        batch[3] = batch[3].bfloat16()
    loss = engine(*batch)
    engine.backward(loss)
    engine.step()
    value = loss.detach().float().clone()
    dist.all_reduce(value, group=state.dp_group())
    return value.item() / state.dp_size()


def run_layouts(layouts: str, save: str, probes: str) -> None:
    """One step and a save per layout (tp<N>-z<stage>[-bf16]), the process group kept between them."""
    from megatron.core import parallel_state

    for layout in layouts.split(","):
        parts = layout.split("-")
        tp, zero, bf16 = int(parts[0][2:]), int(parts[1][1:]), "bf16" in parts
        engine, model = build_engine(tp, zero, bf16)
        train_step(engine, model.cfg, 0)
        engine.save_checkpoint(os.path.join(save, layout), tag="step1", client_state={"model_config": vars(model.cfg)})
        outputs = probe_outputs(copy_of_engine_model(model, zero == 3))
        if dist.get_rank() == 0:
            torch.save(outputs, os.path.join(probes, f"{layout}.pt"))
        del engine, model
        parallel_state.destroy_model_parallel()
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--save", default=None)
    parser.add_argument("--save-at", type=int, default=None, help="save after this many steps (default: at the end)")
    parser.add_argument("--losses", default=None)
    parser.add_argument("--resume-portable", default=None)
    parser.add_argument("--probe", default=None)
    parser.add_argument("--layouts", default=None, help="several layouts in turn, e.g. tp2-z0,tp1-z3")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.layouts:
        run_layouts(args.layouts, args.save, args.probe)
        from vlmo_large.parallel import state
        return state.destroy()

    engine, model = build_engine(args.tp, args.zero, args.bf16)
    start = 0
    if args.resume_portable:
        from vlmo_large.checkpoint import load_portable
        start = load_portable(engine, args.resume_portable)["global_steps"]
    losses = {}
    save_at = args.steps if args.save_at is None else args.save_at
    for step in range(start, args.steps):
        losses[step] = train_step(engine, model.cfg, step)
        if args.save and step + 1 == save_at:
            engine.save_checkpoint(args.save, tag=f"step{step + 1}",
                                   client_state={"model_config": vars(model.cfg)})
            if args.probe:
                outputs = probe_outputs(copy_of_engine_model(model, args.zero == 3))
                if dist.get_rank() == 0:
                    torch.save(outputs, args.probe)
    if args.losses and dist.get_rank() == 0:
        with open(args.losses, "w") as f:
            json.dump(losses, f)
    from vlmo_large.parallel import state
    state.destroy()


if __name__ == "__main__":
    main()
