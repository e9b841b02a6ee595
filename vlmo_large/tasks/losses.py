"""The loss functions the tasks share: ITC, ITM hard negatives, MLM and MIM (docs/MODEL.md sections 4 and 5).

Loss scale and world size. Every loss a rank returns is a mean over its own samples (ITC: its own
rows of the global similarity matrix, against all columns). DeepSpeed averages gradients over
data-parallel ranks, so the optimised quantity is the mean over the global batch at any world
size: the same numbers and gradients as one process on the concatenated batch (ITC exactly, with
`all_gather_with_grad`; MLM as the mean of per-rank token means). Only the ITC value itself grows
with the global batch (more negatives), as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from vlmo_large.parallel.collectives import all_gather_no_grad, all_gather_with_grad, gather_global_rows, group_rank

IGNORE = -100
ITM_PAIRS = 3  # itm_pairs' rows per sample: the positive, a hard-negative image, a hard-negative text


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
    if mlm_head.tp_size == 1:  # the same number; skips megatron's collectives on a one-rank group
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


def mlm_head_flops(cfg, batch: dict) -> float:
    """Forward FLOPs of mlm_loss's head at the predicted tokens (not its padded slots)."""
    predicted = int((batch["mlm_labels"] != IGNORE).sum())
    return float(predicted * 2 * (cfg.embed_dim * cfg.embed_dim + cfg.embed_dim * cfg.vocab_size))
