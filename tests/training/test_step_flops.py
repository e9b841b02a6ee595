"""step_flops against a hand count for the tiny preset, against torch's FLOP counter on a real
step (so that a pass the step adds or drops shows up), and peak_tflops by card."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import randomize_
from vlmo_large.config import get_preset
from vlmo_large.data.masking import max_masked_tokens
from vlmo_large.model import build_model
from vlmo_large.training.objectives import TaskObjective
from vlmo_large.training.random_batches import random_batch
from vlmo_large.training.step_flops import peak_tflops, step_flops

# tiny: width 64, FFN 256, 4 layers of which the top 2 are VL layers, vocab 1024, 64 px images of
# 16 px patches (16 patches + CLS = 17 image tokens), 32 text positions
D, FFN, V, PATCH, PATCHES, IMG = 64, 256, 1024, 16, 16, 17


def block_macs(length: int, kept: int) -> int:
    """Multiply-adds of one block over `length` positions whose output keeps `kept` of them."""
    qkv = length * D * 2 * D + kept * D * D  # keys and values everywhere, queries for the kept
    attention = kept * length * D * 2        # scores and weighted values
    proj_ffn = kept * (D * D + D * FFN + FFN * D)
    return qkv + attention + proj_ffn


def conv_macs() -> int:
    return PATCHES * 3 * PATCH * PATCH * D


def hand_vl(lengths: list[int], masked: int) -> float:
    B = len(lengths)
    macs = 0
    # image pass: layers 0-1, then layers 2-3 twice (VL branch and vision expert), layer 3 keeping CLS
    macs += B * (conv_macs() + 2 * block_macs(IMG, IMG) + 2 * (block_macs(IMG, IMG) + block_macs(IMG, 1)))
    for n in lengths:
        macs += 2 * block_macs(n, n) + 2 * (block_macs(n, n) + block_macs(n, 1))  # text pass, CLS kept
        # fused pass: the MLM row and 3 ITM rows (the drawn negative text counted at this row's length)
        macs += 4 * (conv_macs() + 3 * block_macs(n + IMG, n + IMG) + block_macs(n + IMG, n))
    macs += 2 * (2 * B * D * D + 2 * B * B * D)  # two ITC heads: projections, i2t and t2i logits
    macs += 3 * B * (D * D + D * 2)              # pooler and ITM head on 3B pairs
    macs += masked * (D * D + D * V)             # MLM head at the predicted tokens
    return 3 * 2 * macs


def vl_batch(lengths: list[int], masked_per_row: int) -> dict:
    T = 32
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), -100)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        labels[row, 1:1 + masked_per_row] = 7
    return {"text_mask": mask, "mlm_labels": labels, "text_ids": mask * 9, "mlm_ids": mask * 9,
            "image": torch.zeros(len(lengths), 3, 64, 64)}


def test_stage3_equals_the_hand_count_and_padding_is_not_work():
    cfg = get_preset("tiny")
    full = step_flops(cfg, "vl", vl_batch([32, 32], 3))
    assert full == pytest.approx(hand_vl([32, 32], 6), rel=1e-12)
    padded = step_flops(cfg, "vl", vl_batch([32, 20], 3))
    assert padded == pytest.approx(hand_vl([32, 20], 6), rel=1e-12)
    assert padded < full


def test_stage1_and_stage2_equal_the_hand_count():
    cfg = get_preset("tiny")
    mim_mask = torch.zeros(3, PATCHES, dtype=torch.bool)
    mim_mask[:, :5] = True
    mim = (3 * (conv_macs() + 4 * block_macs(IMG, IMG)) + 15 * D * PATCH * PATCH * 3) * 6
    assert step_flops(cfg, "mim", {"image": torch.zeros(3, 3, 64, 64), "mim_mask": mim_mask}) == pytest.approx(mim)
    batch = vl_batch([32, 10, 5], 2)
    text = (sum(4 * block_macs(n, n) for n in (32, 10, 5)) + 6 * (D * D + D * V)) * 6
    assert step_flops(cfg, "text_mlm", batch) == pytest.approx(text)


@pytest.mark.parametrize("stage", ["vl", "text_mlm", "mim"])
def test_a_real_step_counts_the_formula_plus_its_known_extra_work(stage):
    """torch's counter of a real forward + backward (unpadded, explicit attention) equals
    step_flops plus what the step computes beyond useful work: queries of positions the last
    layer drops, the MLM head's empty slots, the MIM head at unmasked patches, the stage-3 probe's
    forward of the ITC head (its logits pick the hard negatives before the scored pass applies the
    head again); minus the patch embedding's input gradient (images need none)."""
    cfg = get_preset("tiny", attention="explicit")
    torch.manual_seed(0)
    model = randomize_(build_model(cfg))
    batch = random_batch("image" if stage == "mim" else "image_text", cfg, 3, torch.Generator().manual_seed(1))
    if stage != "mim":
        batch["text_mask"][:] = 1
    objective = TaskObjective(model, stage, mlm_prob=0.15)
    with FlopCounterMode(display=False) as counter:
        objective(batch, step=0)["loss"].backward()
    B, T = 3, 32
    dropped_queries = {"vl": B * (2 * (IMG - 1) + 2 * (T - 1)) + 4 * B * IMG, "text_mlm": 0, "mim": 0}[stage]
    slots = 0 if stage == "mim" else B * max_masked_tokens(T, 0.15) - int((batch["mlm_labels"] != -100).sum())
    image_passes = {"vl": 5 * B, "text_mlm": 0, "mim": B}[stage]
    unmasked_patches = B * PATCHES - int(batch["mim_mask"].sum()) if stage == "mim" else 0
    extra = 3 * 2 * (dropped_queries * D * D + slots * (D * D + D * V) + unmasked_patches * D * PATCH * PATCH * 3) \
        - 2 * conv_macs() * image_passes
    if stage == "vl":  # the probe: image and text projections, then the i2t and t2i logits, forward only
        extra += 2 * (2 * B * D * D) + 2 * (2 * B * B * D)
    assert counter.get_total_flops() == pytest.approx(step_flops(cfg, stage, batch) + extra, rel=1e-9)


def test_peak_by_exact_card():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 67.0
    assert peak_tflops("cpu", "fp32") is None and peak_tflops("NVIDIA L4", "bf16") is None


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown task 'foo'"):
        step_flops(get_preset("tiny"), "foo", {})
