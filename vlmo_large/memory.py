"""Parameter counts and per-GPU memory estimates for a preset and a parallel layout.

Model states follow DeepSpeed's own accounting (its `estimate_zero{2,3}_model_states_mem_needs`),
bytes per parameter of one model-parallel rank, with N data-parallel ranks:
  mixed precision (bf16/fp16):  params16 2, grads16 2, fp32 grads 4, fp32 master 4, Adam 8
    ZeRO-0: 20            ZeRO-1: 2 + 2 + 16/N      ZeRO-2: 2 + 18/N
    ZeRO-3: 18/N + 4 x (largest single module's parameters, gathered for compute)
  fp32: params 4, grads 4, Adam 8 (ZeRO partitions them the same way).
Activations: Megatron's per-layer estimate (Korthikanti et al. 2022) for tokens s, micro-batch b,
width h, heads a, TP t, 16-bit: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes; with activation checkpointing
only each layer's input (2*s*b*h) is kept, plus one layer's full activations during recompute.
Summed over the passes of one stage-3 step (image, text, both VL branches, 3B fused ITM pairs, the
fused MLM pass).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from vlmo_large.config import ModelConfig
from vlmo_large.model import build_model
from vlmo_large.parallel.layout import check_pipeline_depth, check_pipeline_zero, stage_of

GIB = 1024 ** 3


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 3
    micro_batch: int = 32
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    checkpoint_activations: bool = True


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    model = build_model(cfg, device="meta")
    blocks = model.backbone.blocks
    counts = {
        "backbone_params": _numel(model.backbone),
        "total_params": _numel(model),
        "heads_params": _numel(model) - _numel(model.backbone),
        "attention_params": sum(_numel(b.attn) + _numel(b.norm1) for b in blocks),
    }
    for expert in ("imag", "text", "vl"):
        counts[f"expert_{expert}_params"] = sum(_numel(b.experts[expert]) for b in blocks if expert in b.experts)
    # one token uses the shared path and one expert per layer; the largest is the vision expert
    counts["active_params_per_token"] = counts["total_params"] - counts["expert_text_params"] - counts["expert_vl_params"]
    counts["tensor_parallel_params"] = sum(p.numel() for p in model.parameters()
                                           if getattr(p, "tensor_model_parallel", False))
    counts["largest_module_params"] = max(sum(p.numel() for p in m.parameters(recurse=False))
                                          for m in model.modules())
    counts["block_params"] = sum(_numel(b) for b in blocks)
    return counts


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_state_bytes(params_per_rank: int, largest_module: int, layout: Layout) -> int:
    n, p = layout.dp, params_per_rank
    if layout.dtype == "fp32":
        weights, grads, optim = 4 * p, 4 * p, 8 * p
        if layout.zero == 0:
            return weights + grads + optim
        if layout.zero == 1:
            return weights + grads + optim // n
        if layout.zero == 2:
            return weights + (grads + optim) // n
        return (weights + grads + optim) // n + 4 * largest_module
    if layout.zero == 0:
        return 20 * p
    if layout.zero == 1:
        return 4 * p + 16 * p // n
    if layout.zero == 2:
        return 2 * p + 18 * p // n
    return 4 * largest_module + 18 * p // n


def activation_bytes(cfg: ModelConfig, layout: Layout) -> int:
    b, h, a, t = layout.micro_batch, cfg.embed_dim, cfg.num_heads, layout.tp
    img, txt = cfg.num_patches + 1, cfg.max_text_len
    vl_layers, depth = cfg.num_vl_layers, cfg.depth
    # (tokens, batch, layers) of every pass in one stage-3 step
    passes = [(img, b, depth), (txt, b, depth), (img, b, vl_layers), (txt, b, vl_layers),
              (txt + img, 3 * b, depth), (txt + img, b, depth)]
    scale = 2 if layout.dtype != "fp32" else 4
    total, largest_layer = 0, 0
    for s, batch, layers in passes:
        layers = -(-layers // layout.pp)
        full = s * batch * h * (10 + 24 / t + 5 * a * s / (h * t)) * scale / 2
        largest_layer = max(largest_layer, full)
        total += layers * (2 * s * batch * h * scale / 2 if layout.checkpoint_activations else full)
    return int(total + (largest_layer if layout.checkpoint_activations else 0))


def params_per_stage(cfg: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters one GPU holds on each pipeline stage at tensor-parallel size `tp` (exact).

    Stages split as the pipeline splits them (parallel/layout.py stage_of).
    """
    model = build_model(cfg, device="meta")
    per_stage = [0] * pp
    for name, param in model.named_parameters():
        n = param.numel() // tp if getattr(param, "tensor_model_parallel", False) else param.numel()
        per_stage[stage_of(name, cfg.depth, pp)] += n
    return per_stage


def estimate(cfg: ModelConfig, layout: Layout) -> dict:
    cfg.validate(tensor_parallel=layout.tp)
    check_pipeline_zero(layout.pp, layout.zero)
    check_pipeline_depth(cfg, layout.pp)
    counts = parameter_counts(cfg)
    per_rank = max(params_per_stage(cfg, layout.tp, layout.pp))
    largest = counts["largest_module_params"] // layout.tp
    states = model_state_bytes(per_rank, largest, layout)
    acts = activation_bytes(cfg, layout)
    return {**counts, "layout": asdict(layout), "params_per_gpu": per_rank,
            "model_states_gib": states / GIB, "activations_gib": acts / GIB,
            "total_gib": (states + acts) / GIB}
