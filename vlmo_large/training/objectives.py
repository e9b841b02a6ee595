"""Pretraining losses of the three stages (spec sections 4 and 5).

Loss scale and world size. Every loss a rank returns is a mean over its own samples (ITC: its own
rows of the global similarity matrix, against all columns). DeepSpeed averages gradients over
data-parallel ranks, so the optimised quantity is the mean over the global batch at any world
size: the same numbers and gradients as one process on the concatenated batch (ITC exactly, with
`all_gather_with_grad`; MLM as the mean of per-rank token means). Only the ITC value itself grows
with the global batch (more negatives), as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from vlmo_large.data.masking import max_masked_tokens
from vlmo_large.parallel import state
from vlmo_large.parallel.collectives import all_gather_no_grad, all_gather_with_grad, gather_global_rows, group_rank
from vlmo_large.training.run_config import DATA_KIND, STAGES  # noqa: F401 (re-exported)

IGNORE = -100
ITM_PAIRS = 3  # itm_pairs' rows per sample: the positive, a hard-negative image, a hard-negative text


@dataclass(frozen=True)
class EncoderPass:
    """One encoder call of a training step: `mode` ("image", "text" or "pair"), run on `copies` times
    the micro-batch's rows, with the VL-branch top layers too (`vl_branch`), and the last layer
    computing only the positions `keep` names ("cls", "text", or None: all). The stage functions
    below call the encoders from these, and step_flops.py counts a step's FLOPs from them."""
    mode: str
    copies: int = 1
    vl_branch: bool = False
    keep: str | None = None

    def kept(self, text_len: int) -> int | None:
        return {"cls": 1, "text": text_len, None: None}[self.keep]


# what each stage's step runs, in order (mim_losses, text_mlm_losses, vl_losses)
STEP_PASSES = {
    "mim": (EncoderPass("image"),),
    "text_mlm": (EncoderPass("text"),),
    "vl": (EncoderPass("image", vl_branch=True, keep="cls"),  # ITC reads CLS only
           EncoderPass("text", vl_branch=True, keep="cls"),
           EncoderPass("pair", copies=1 + ITM_PAIRS, keep="text")),  # the MLM rows, then the ITM pairs
}


@dataclass(frozen=True)
class LossWeights:
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 0.25


# -- ITC ---------------------------------------------------------------------------------------
def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor,
                     group=None):
    """Symmetric InfoNCE of this rank's rows against the global batch.

    image_feats / text_feats: [B, D] L2-normalised, local. Returns (loss, i2t, t2i) with the local
    rows of the global logit matrices, [B, B_global]; the positive of local row b is column
    rank * B + b. The mean of the returned loss over ranks is the global-batch loss.
    """
    all_images = all_gather_with_grad(image_feats, group)
    all_texts = all_gather_with_grad(text_feats, group)
    scale = logit_scale.exp()
    i2t = scale * image_feats.float() @ all_texts.float().t()
    t2i = scale * text_feats.float() @ all_images.float().t()
    targets = positive_columns(image_feats.shape[0], group, image_feats.device)
    loss = (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets)) / 2
    return loss, i2t, t2i


def positive_columns(local_batch: int, group, device) -> torch.Tensor:
    return torch.arange(local_batch, device=device) + group_rank(group) * local_batch


# -- ITM hard negatives -------------------------------------------------------------------------
@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
    """One column per row, drawn with probability softmax(row) with the positive zeroed.

    The positive is masked before the softmax (the same distribution once renormalised, which
    torch.multinomial does) so that a confident row cannot underflow to all zeros. `exclude`
    ([rows, columns] bool) masks more columns the same way (e.g. texts identical to the positive).
    A row whose weights are not finite (a diverged model: inf/NaN similarities) or that has no
    allowed column left draws uniformly from the columns other than the positive, so sampling never
    fails and the non-finite loss reaches the trainer, which stops on it.
    """
    rows = torch.arange(len(positives), device=logits.device)
    others = torch.ones_like(logits, dtype=torch.bool)
    others[rows, positives] = False
    allowed = others if exclude is None else others & ~exclude
    masked = logits.float().masked_fill(~allowed, float("-inf"))
    probs = masked.softmax(dim=1)
    broken = ~(torch.isfinite(probs).all(1) & (probs.sum(1) > 0))
    probs = torch.where(broken[:, None], others.float(), probs)  # no host sync on a GPU
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def itm_pairs(batch: dict, i2t: torch.Tensor, t2i: torch.Tensor, group=None,
              generator: torch.Generator | None = None, skip_identical_text: bool = False) -> dict:
    """3B (text, image) pairs: B positive, then for each local text a hard-negative image, then for
    each local image a hard-negative text, both drawn from the global batch. Token ids and masks
    are all-gathered (small); of the images only the B drawn ones travel (gather_global_rows).

    skip_identical_text: never draw a candidate whose text (token ids) equals the positive's: with
    repeated captions ("a dog on a beach") such an image or text is no negative at all."""
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    all_ids, all_mask = all_gather_no_grad(ids, group), all_gather_no_grad(mask, group)
    positives = positive_columns(images.shape[0], group, images.device)
    same = None
    if skip_identical_text:  # [local texts, global texts]
        same = (ids[:, None] == all_ids[None]).all(-1) & (mask[:, None] == all_mask[None]).all(-1)
    image_for_text = sample_hard_negatives(t2i, positives, generator, same)
    text_for_image = sample_hard_negatives(i2t, positives, generator, same)
    B = images.shape[0]
    return {
        "text_ids": torch.cat([ids, ids, all_ids[text_for_image]]),
        "text_mask": torch.cat([mask, mask, all_mask[text_for_image]]),
        "image": torch.cat([images, gather_global_rows(images, image_for_text, group), images]),
        "labels": itm_labels(B, images.device),
        "image_for_text": image_for_text, "text_for_image": text_for_image,
    }


def itm_labels(local_batch: int, device) -> torch.Tensor:
    """1 for the B positives, 0 for the 2B negatives (itm_pairs' order), made on `device`."""
    return (torch.arange(ITM_PAIRS * local_batch, device=device) < local_batch).long()


# -- MLM / MIM ----------------------------------------------------------------------------------
def masked_slots(labels: torch.Tensor, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S] positions, [B, S] targets): each row's predicted positions first, in order, then
    unpredicted ones whose target is IGNORE. S = slots (at most T), a static count, so the gather has
    one shape per run and needs no host sync (boolean indexing would); None: every position."""
    T = labels.shape[1]
    slots = T if slots is None else min(slots, T)
    picked = labels != IGNORE
    if slots < T:  # more predicted tokens than slots would drop some silently: the masking caps them
        torch._assert_async(picked.sum(1).max() <= slots,
                            f"an MLM row predicts more than {slots} tokens (data.masking's cap)")
    positions = torch.sort(picked.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :slots]
    return positions, labels.gather(1, positions)


def mlm_loss(mlm_head, hidden: torch.Tensor, labels: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """Vocab-parallel CE, mean over the predicted tokens (0 when there are none). The head sees only
    `slots` gathered positions per row (masked_slots), which saves the vocabulary projection of
    ~85% of the tokens; a slot without a target weighs 0."""
    positions, targets = masked_slots(labels, slots)
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = mlm_head(picked).float()
    valid = targets != IGNORE
    count = valid.sum().clamp(min=1)
    if state.tp_size() == 1:  # the same number; skips megatron's collectives on a one-rank group
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    else:  # megatron has no ignore index: an IGNORE target gets a finite loss that the weight removes
        per_token = vocab_parallel_cross_entropy(logits, targets).flatten()
        per_token = per_token * valid.flatten()
    return per_token.sum() / count


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch*patch*C] in row-major patch order (the patch embedding's)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def normalized_pixel_targets(images: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """MAE's target: every patch's pixels normalised by that patch's own mean and variance."""
    patches = patchify(images.float(), patch)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_loss(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MIM loss over the masked patches: MSE against float targets [B, N, out] (normalised pixels),
    else CE against token ids [B, N]. The head predicts every patch and the mask weighs the terms:
    boolean indexing would size its result from the mask on the host (a sync on a GPU) and the
    head is small next to the encoder. Equals the mean over masked patches (0 when none)."""
    mask = mask.to(pred.dtype)
    if targets.is_floating_point():
        per_patch = (pred - targets.to(pred.dtype)).pow(2).mean(-1)
    else:
        per_patch = F.cross_entropy(pred.flatten(0, 1), targets.flatten(), reduction="none").view_as(mask)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


# -- the stages -----------------------------------------------------------------------------------
def mim_losses(model, batch: dict) -> dict:
    """Stage 1: predict the masked patches (normalised pixels, or visual-token ids if the config's
    mim_target is "token" and the batch carries "mim_targets" [B, N])."""
    mask = batch["mim_mask"].bool()
    (image_pass,) = STEP_PASSES["mim"]
    hidden = model.backbone.encode_image(batch["image"], image_pass.vl_branch, mim_mask=mask,
                                         mask_token=model.mim_head.mask_token, keep=image_pass.kept(0))
    targets = batch["mim_targets"] if model.cfg.mim_target == "token" else \
        normalized_pixel_targets(batch["image"], model.cfg.patch_size)
    loss = masked_patch_loss(model.mim_head(hidden[:, 1:]).float(), targets, mask)
    return {"loss": loss, "mim": loss}


def text_mlm_losses(model, batch: dict, mlm_slots: int | None = None) -> dict:
    """Stage 2: MLM on text alone (language expert in every layer). mlm_slots: see mlm_loss."""
    (text_pass,) = STEP_PASSES["text_mlm"]
    hidden = model.backbone.encode_text(batch["mlm_ids"], batch["text_mask"], text_pass.vl_branch,
                                        text_pass.kept(batch["mlm_ids"].shape[1]))
    loss = mlm_loss(model.mlm_head, hidden, batch["mlm_labels"], mlm_slots)
    return {"loss": loss, "mlm": loss}


def vl_losses(model, batch: dict, weights: LossWeights = LossWeights(), group=None,
              generator: torch.Generator | None = None, itm_skip_identical_text: bool = False,
              mlm_slots: int | None = None) -> dict:
    """Stage 3: ITC (final and VL-branch CLS), ITM with global hard negatives, MLM on the fused
    encoder. The MLM pairs and the 3B ITM pairs go through the fused encoder as one batch.
    mlm_slots: see mlm_loss."""
    bb = model.backbone
    image_pass, text_pass, fused_pass = STEP_PASSES["vl"]
    B, T = batch["text_ids"].shape
    assert image_pass.vl_branch and text_pass.vl_branch and image_pass.keep == text_pass.keep == "cls"
    (image, image_vl), (text, text_vl) = bb.encode_image_and_text(batch["image"], batch["text_ids"],
                                                                  batch["text_mask"])
    itc_main, i2t, t2i = contrastive_loss(*model.itc(image[:, 0], text[:, 0]), model.itc.logit_scale, group)
    itc_vl, _, _ = contrastive_loss(*model.itc_vl(image_vl[:, 0], text_vl[:, 0]), model.itc_vl.logit_scale, group)
    itc = (itc_main + itc_vl) / 2

    pairs = itm_pairs(batch, i2t.detach(), t2i.detach(), group, generator, itm_skip_identical_text)
    fused_ids = torch.cat([batch["mlm_ids"], pairs["text_ids"]])
    assert fused_ids.shape[0] == fused_pass.copies * B, "STEP_PASSES['vl'] no longer describes the fused pass"
    fused = bb.encode_pair(fused_ids, torch.cat([batch["text_mask"], pairs["text_mask"]]),
                           torch.cat([batch["image"], pairs["image"]]), keep=fused_pass.kept(T))
    mlm = mlm_loss(model.mlm_head, fused[:B], batch["mlm_labels"], mlm_slots)
    itm_logits = model.itm_head(model.pooler(fused[B:])).float()
    itm = F.cross_entropy(itm_logits, pairs["labels"])
    itm_acc = (itm_logits.argmax(-1) == pairs["labels"]).float().mean()
    total = weights.itc * itc + weights.itm * itm + weights.mlm * mlm
    return {"loss": total, "itc": itc, "itc_vl": itc_vl, "itm": itm, "mlm": mlm, "itm_acc": itm_acc,
            "logit_scale": model.itc.logit_scale.detach().exp().reshape(())}




class PretrainingObjective(torch.nn.Module):
    """What DeepSpeed wraps: VLMo (as `.model`) and the loss of one stage.

    forward(batch, step) -> dict of scalars, "loss" the one to backpropagate. `step` seeds the ITM
    negative sampler (with the seed and data-parallel rank), so a resumed run draws the same
    negatives as an uninterrupted one whatever the global RNG state. `itm_skip_identical_text`:
    see itm_pairs (off by default, as in the reference). `mlm_prob`: the data's masking rate, whose
    cap (data.masking.max_masked_tokens) fixes the MLM head's slots per row; None (batches masked
    by another rule): every position.
    """

    def __init__(self, model, stage: str, weights: LossWeights = LossWeights(), group=None, seed: int = 0,
                 itm_skip_identical_text: bool = False, mlm_prob: float | None = None):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}'; choose one of {STAGES}")
        self.model, self.stage, self.weights, self.group, self.seed = model, stage, weights, group, seed
        self.itm_skip_identical_text = itm_skip_identical_text
        self.mlm_slots = None if mlm_prob is None else max_masked_tokens(model.cfg.max_text_len, mlm_prob)

    def forward(self, batch: dict, step: int = 0) -> dict:
        if self.stage == "mim":
            return mim_losses(self.model, batch)
        if self.stage == "text_mlm":
            return text_mlm_losses(self.model, batch, self.mlm_slots)
        device = batch["image"].device
        generator = torch.Generator(device=device).manual_seed(
            (self.seed * 1_000_003 + step) * 4099 + group_rank(self.group))
        return vl_losses(self.model, batch, self.weights, self.group, generator, self.itm_skip_identical_text,
                         self.mlm_slots)
