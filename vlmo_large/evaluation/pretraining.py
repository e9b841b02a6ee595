"""Held-out evaluation of the stage-3 objectives: zero-shot retrieval, ITM and MLM accuracy.

    metrics = evaluate_pretraining(model, val_loader, max_batches=50)
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)

Batches are the data pipeline's ("image", "text_ids", "text_mask", and optionally "mlm_ids",
"mlm_labels", "index"). Under data parallelism every rank passes its own share and gets the same
result: features are all-gathered and counts summed over the data-parallel group (gather.py), so
every metric is over the whole split. Every rank of the group must call this (it is a collective).
Pipeline-parallel models are not supported (the encoders must run on one stage).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from vlmo_large.data.device_batch import model_pixels
from vlmo_large.evaluation.gather import default_group, gather_rows, sum_over_ranks, vocab_parallel_argmax
from vlmo_large.evaluation.retrieval import chance_r_at_1, retrieval_metrics


def encode_for_retrieval(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
    """The dual encoder (V-FFN / L-FFN paths) -> ITC heads: L2-normalised (image, text) features."""
    image_cls = model.backbone.encode_image(images)[:, 0]
    text_cls = model.backbone.encode_text(text_ids, text_mask)[:, 0]
    return model.itc(image_cls, text_cls)


def itm_match_logits(model, text_ids, text_mask, images) -> torch.Tensor:
    """[B, 2] logits (index 1 = "matches") from the fused encoder's pooled first token."""
    return model.itm_head(model.pooler(model.backbone.encode_pair(text_ids, text_mask, images)))


def negative_shift(batch_size: int, generator: torch.Generator) -> int:
    """Negatives pair text i with image (i - shift) mod B: a random rotation never pairs a text
    with its own position (a shuffled permutation could)."""
    return int(torch.randint(1, batch_size, (1,), generator=generator)) if batch_size > 1 else 0


@torch.no_grad()
def evaluate_pretraining(model, batches: Iterable[Mapping], max_batches: int | None = None,
                         seed: int = 0, group="default") -> dict[str, float]:
    """Flat dict of floats (fractions in [0, 1], plus counts):
    tr_r1/5/10, ir_r1/5/10 (dual-encoder zero-shot retrieval among the split's images and
    captions; samples sharing "index" are one image with several captions), chance_r1;
    itm_pos_neg_acc (positives and rotated in-batch negatives together; not the vl task's loss term
    itm_acc, over hard negatives), itm_pos_acc, itm_neg_acc;
    mlm_acc (argmax at positions whose label is not -100); num_images, num_texts, num_mlm_tokens.
    Runs in eval mode without gradients and restores the model's mode. Metrics whose inputs are
    absent (no MLM labels, batches of one) are left out. `group`: the data-parallel group
    ("default": megatron's, else the world; None: the world)."""
    group = default_group() if group == "default" else group
    model = getattr(model, "module", model)  # a DeepSpeed engine / DDP wrapper: the model inside
    was_training = model.training
    model.eval()
    try:
        local = _run_batches(model, batches, max_batches, seed)
    finally:
        model.train(was_training)
    return _reduce(local, group)


def _run_batches(model, batches, max_batches, seed) -> dict:
    param = next(model.parameters())
    device = param.device
    generator = torch.Generator().manual_seed(seed)
    image_feats, text_feats, image_keys = [], [], []
    # counts: itm positives right, positives, negatives right, negatives, mlm right, mlm tokens
    counts = torch.zeros(6, dtype=torch.float64)
    offset = 0
    for step, batch in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        images = model_pixels(batch["image"], device, param.dtype)  # uint8 or normalised; bf16 models take bf16
        ids, mask = batch["text_ids"].to(device), batch["text_mask"].to(device)
        size = images.shape[0]
        keys = batch["index"].to(device) if "index" in batch else None
        img, txt = encode_for_retrieval(model, images, ids, mask)
        image_feats.append(img.float())
        text_feats.append(txt.float())
        # Without "index" every sample is its own image; ids stay unique across batches.
        image_keys.append(keys if keys is not None else torch.arange(offset, offset + size, device=device))
        offset += size
        counts[:4] += _itm_counts(model, ids, mask, images, image_keys[-1], negative_shift(size, generator))
        if "mlm_ids" in batch and "mlm_labels" in batch:
            counts[4:] += _mlm_counts(model, batch["mlm_ids"].to(device), mask, images,
                                      batch["mlm_labels"].to(device))
    if not image_feats:
        raise ValueError("evaluate_pretraining: no batches")
    return {"image_feats": torch.cat(image_feats), "text_feats": torch.cat(text_feats),
            "image_keys": torch.cat(image_keys), "counts": counts.to(device)}


def _itm_counts(model, ids, mask, images, image_keys, shift) -> torch.Tensor:
    pos_right = (itm_match_logits(model, ids, mask, images).argmax(-1) == 1).sum().item()
    neg_right = negatives = 0
    if shift:
        # Skip pairs whose "negative" image is the same picture (several captions of one image).
        valid = image_keys != image_keys.roll(shift, 0)
        if valid.any():
            logits = itm_match_logits(model, ids[valid], mask[valid], images.roll(shift, 0)[valid])
            neg_right, negatives = (logits.argmax(-1) == 0).sum().item(), int(valid.sum())
    return torch.tensor([pos_right, images.shape[0], neg_right, negatives], dtype=torch.float64)


def _mlm_counts(model, mlm_ids, mask, images, labels) -> torch.Tensor:
    hidden = model.backbone.encode_pair(mlm_ids, mask, images)[:, :mlm_ids.shape[1]]  # text first
    masked = labels != -100
    logits = model.mlm_head(hidden[masked])
    predicted = _full_vocab_argmax(model, logits)
    return torch.tensor([(predicted == labels[masked]).sum().item(), int(masked.sum())], dtype=torch.float64)


def _full_vocab_argmax(model, logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == model.cfg.vocab_size:
        return logits.argmax(-1)
    # Tensor parallel: this rank holds a slice of the vocabulary, split over the head's own group.
    group = model.mlm_head.decoder.tp_group
    return vocab_parallel_argmax(logits, group, group.rank())


def _reduce(local: dict, group) -> dict[str, float]:
    image_feats = gather_rows(local["image_feats"], group)
    text_feats = gather_rows(local["text_feats"], group)
    keys = gather_rows(local["image_keys"], group)
    pos_right, positives, neg_right, negatives, mlm_right, mlm_tokens = sum_over_ranks(local["counts"], group).tolist()
    # One row per distinct image (its first occurrence); each caption points at its image's row.
    unique, text_to_image = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((unique.shape[0],), keys.shape[0], device=keys.device).scatter_reduce(
        0, text_to_image, positions, reduce="amin")
    metrics = retrieval_metrics(image_feats[first], text_feats, text_to_image)
    num_images = int(unique.shape[0])
    metrics.update(chance_r1=chance_r_at_1(num_images), num_images=float(num_images),
                   num_texts=float(text_feats.shape[0]))
    metrics.update(itm_pos_acc=pos_right / positives)
    if negatives:
        metrics.update(itm_pos_neg_acc=(pos_right + neg_right) / (positives + negatives),
                       itm_neg_acc=neg_right / negatives)
    if mlm_tokens:
        metrics.update(mlm_acc=mlm_right / mlm_tokens, num_mlm_tokens=mlm_tokens)
    return metrics
