"""Useful training FLOPs of a micro-batch and the peak of the card: the one formula behind MFU.

    step_flops(model_cfg, task, batch) -> float    # matmul FLOPs, forward + backward
    peak_tflops(device_name, dtype) -> float | None

The encoder passes come from the task's own description (Task.passes: which encoder, how many
copies of the rows, the VL branch, what the last layer keeps), so a change of the step changes the
count; the heads' FLOPs from Task.head_flops. Only useful work counts: text positions where text_mask is 1 (padding
is computed but is not work), the MLM head at predicted tokens (not its padded slots), the last
layer at the positions it keeps. Counted: every matrix multiply (2 FLOPs a multiply-add) in the
blocks (qkv, projection, the routed expert's FFN, attention scores and values), the patch
embedding and the heads; backward is twice the forward (the usual 3x). Norms, softmax, GELU and
embedding lookups are not counted, as in MFU elsewhere (PaLM, Megatron).

The ITM pairs' drawn negative texts are not known before the step: their lengths are taken as
the micro-batch's own, which is exact in expectation (the negatives are drawn from the batch).
"""
from __future__ import annotations

import torch

from vlmo_large.config import ModelConfig
from vlmo_large.tasks.base import EncoderPass, Task
from vlmo_large.tasks.registry import get_task

BACKWARD_FACTOR = 3  # forward + backward (input and weight gradients: twice the forward)


def _full_layers(cfg: ModelConfig, tokens: torch.Tensor, layers: int) -> torch.Tensor:
    """Forward FLOPs of `layers` blocks over `tokens` positions per row (every position kept)."""
    D, F = cfg.embed_dim, cfg.ffn_dim
    return layers * (2 * (4 * D * D + 2 * D * F) * tokens + 4 * tokens * tokens * D)


def _kept_layer(cfg: ModelConfig, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A last block that computes `kept` positions: keys and values of all, the rest of the kept."""
    D, F = cfg.embed_dim, cfg.ffn_dim
    return 2 * 2 * D * D * tokens + 2 * (2 * D * D + 2 * D * F) * kept + 4 * kept * tokens * D


def _encoder(cfg: ModelConfig, encoder_pass: EncoderPass, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-row forward FLOPs of one encoder pass (backbone.py's layer walk) over `tokens` positions."""
    kept = {"cls": torch.ones_like(tokens), "text": text, None: tokens}[encoder_pass.keep]
    if encoder_pass.mode == "pair":  # every layer in one walk, the last one keeping
        return _full_layers(cfg, tokens, cfg.depth - 1) + _kept_layer(cfg, tokens, kept)
    top = cfg.num_vl_layers
    branches = 2 if encoder_pass.vl_branch else 1  # the VL branch reruns the top layers in VL mode
    flops = _full_layers(cfg, tokens, cfg.vl_start)
    if top:
        flops = flops + branches * (_full_layers(cfg, tokens, top - 1) + _kept_layer(cfg, tokens, kept))
    return flops


def _patch_embedding(cfg: ModelConfig) -> int:
    return 2 * cfg.in_chans * cfg.patch_size ** 2 * cfg.embed_dim * cfg.num_patches


def _text_lengths(batch: dict) -> torch.Tensor:
    return batch["text_mask"].detach().to("cpu", torch.float64).sum(1)


def _passes(cfg: ModelConfig, task: Task, batch: dict) -> float:
    """Forward FLOPs of the task's encoder passes (Task.passes) over the micro-batch."""
    image_tokens = cfg.num_patches + 1
    if task.reads_text:
        text = _text_lengths(batch)
        rows = text.shape[0]
    else:
        rows = batch["image"].shape[0]
        text = torch.zeros(rows, dtype=torch.float64)
    total = 0.0
    for encoder_pass in task.passes:
        if encoder_pass.mode == "image":
            tokens = torch.full((rows,), float(image_tokens), dtype=torch.float64)
            flops = _encoder(cfg, encoder_pass, tokens, text).sum() + rows * _patch_embedding(cfg)
        elif encoder_pass.mode == "text":
            flops = _encoder(cfg, encoder_pass, text, text).sum()
        else:
            flops = _encoder(cfg, encoder_pass, text + image_tokens, text).sum() + rows * _patch_embedding(cfg)
        total += encoder_pass.copies * float(flops)
    return total


def step_flops(model_cfg: ModelConfig, task, batch: dict, data_parallel: int = 1) -> float:
    """Useful training FLOPs (forward + backward) of one micro-batch of `task` (a Task or its
    name) on one rank; the batch as the data pipeline yields it (host tensors: nothing is read from a
    device). data_parallel: ranks whose batches the ITC similarity spans (its logits are [B, B * ranks])."""
    task = get_task(task)
    return BACKWARD_FACTOR * (_passes(model_cfg, task, batch) + task.head_flops(model_cfg, batch, data_parallel))


# Dense (no sparsity) peak TFLOP/s by card, from NVIDIA's datasheets: bf16/fp16 tensor cores, and
# fp32 without TF32 (the CUDA cores). Checked most specific name first.
_PEAKS = (
    ("h200 nvl", {"bf16": 835.0, "fp32": 60.0}),
    ("h100 nvl", {"bf16": 835.0, "fp32": 60.0}),
    ("h100 pcie", {"bf16": 756.0, "fp32": 51.0}),
    ("gh200", {"bf16": 989.0, "fp32": 67.0}),
    ("h200", {"bf16": 989.0, "fp32": 67.0}),
    ("h100", {"bf16": 989.0, "fp32": 67.0}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("a100", {"bf16": 312.0, "fp32": 19.5}),
)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of the card named like torch.cuda.get_device_name() for "bf16", "fp16"
    or "fp32"; None for a CPU or a card not in the table."""
    name = (device_name or "").lower()
    kind = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16", "float16": "bf16",
            "fp32": "fp32", "float32": "fp32"}.get(str(dtype).lower().replace("torch.", ""))
    if kind is None:
        return None
    for key, peaks in _PEAKS:
        if key in name:
            return peaks[kind]
    return None
