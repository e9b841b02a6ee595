"""Useful training FLOPs of a micro-batch and the peak of the card: the one formula behind MFU.

    step_flops(model_cfg, stage, batch) -> float   # matmul FLOPs, forward + backward
    peak_tflops(device_name, dtype) -> float | None

The encoder passes come from the objective's own description (objectives.STEP_PASSES: which
encoder, how many copies of the rows, the VL branch, what the last layer keeps), so a change of
the step changes the count. Only useful work counts: text positions where text_mask is 1 (padding
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
from vlmo_large.training.objectives import IGNORE, ITM_PAIRS, STEP_PASSES, EncoderPass

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


def _mlm_head(cfg: ModelConfig, batch: dict) -> float:
    predicted = int((batch["mlm_labels"] != IGNORE).sum())
    D = cfg.embed_dim
    return predicted * 2 * (D * D + D * cfg.vocab_size)


def _passes(cfg: ModelConfig, stage: str, batch: dict) -> float:
    """Forward FLOPs of the stage's encoder passes (STEP_PASSES) over the micro-batch."""
    image_tokens = cfg.num_patches + 1
    if stage == "mim":
        rows = batch["image"].shape[0]
        text = torch.zeros(rows, dtype=torch.float64)
    else:
        text = _text_lengths(batch)
        rows = text.shape[0]
    total = 0.0
    for encoder_pass in STEP_PASSES[stage]:
        if encoder_pass.mode == "image":
            tokens = torch.full((rows,), float(image_tokens), dtype=torch.float64)
            flops = _encoder(cfg, encoder_pass, tokens, text).sum() + rows * _patch_embedding(cfg)
        elif encoder_pass.mode == "text":
            flops = _encoder(cfg, encoder_pass, text, text).sum()
        else:
            flops = _encoder(cfg, encoder_pass, text + image_tokens, text).sum() + rows * _patch_embedding(cfg)
        total += encoder_pass.copies * float(flops)
    return total


def _heads(cfg: ModelConfig, stage: str, batch: dict, data_parallel: int) -> float:
    """Forward FLOPs of the stage's heads (objectives.py's mim_losses / text_mlm_losses / vl_losses)."""
    D = cfg.embed_dim
    if stage == "mim":
        out = cfg.patch_size ** 2 * cfg.in_chans if cfg.mim_target == "pixel" else cfg.mim_vocab_size
        return float(int(batch["mim_mask"].sum()) * 2 * D * out)
    if stage == "text_mlm":
        return float(_mlm_head(cfg, batch))
    B = batch["text_mask"].shape[0]
    itc = 2 * (2 * B * 2 * D * D + 2 * 2 * B * (B * data_parallel) * D)  # two ITC heads: projections, logits
    itm = ITM_PAIRS * B * 2 * (D * D + 2 * D)  # pooler and the 2-way head on the pairs' CLS
    return float(itc + itm + _mlm_head(cfg, batch))


def step_flops(model_cfg: ModelConfig, stage: str, batch: dict, data_parallel: int = 1) -> float:
    """Useful training FLOPs (forward + backward) of one micro-batch of `stage` on one rank; the
    batch as the data pipeline yields it (host tensors: nothing is read from a device).
    data_parallel: ranks whose batches the ITC similarity spans (its logits are [B, B * ranks])."""
    if stage not in STEP_PASSES:
        raise ValueError(f"unknown stage '{stage}'; choose one of {tuple(STEP_PASSES)}")
    return BACKWARD_FACTOR * (_passes(model_cfg, stage, batch) + _heads(model_cfg, stage, batch, data_parallel))


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
