"""Held-out evaluation of the stage-3 objectives: zero-shot retrieval, ITM and MLM accuracy.

    metrics = evaluate_pretraining(model, val_loader, max_batches=50)
    tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)

Batches are the data pipeline's ("image", "text_ids", "text_mask", and optionally "mlm_ids",
"mlm_labels", "index"). Under data parallelism every rank passes its own share and gets the same
result: features are all-gathered and counts summed over the data-parallel group (gather.py), so
every metric is over the whole split. Every rank of the group must call this (it is a collective).
A pipeline-parallel model runs the same encoder calls as passes (tasks/pretraining_metrics.py), and
its last stage computes batch_metrics.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, Mapping

import torch

from vlmo_large.data.device_batch import model_pixels
from vlmo_large.evaluation.gather import default_group, gather_rows, sum_over_ranks, vocab_parallel_argmax
from vlmo_large.evaluation.retrieval import chance_r_at_1, retrieval_metrics


def encode_for_retrieval(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor):
    """The dual encoder (V-FFN / L-FFN paths) -> ITC heads: L2-normalised (image, text) features."""
    image_cls = model.backbone.encode_image(images)[:, 0]
    text_cls = model.backbone.encode_text(text_ids, text_mask)[:, 0]
    return model.itc(image_cls, text_cls)


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
    ("default": megatron's, else the world; None: the world).

    In pieces: plan_batches, the encoder calls (pretraining_encode), batch_metrics of each batch,
    reduce_batches; the pipeline's last stage computes batch_metrics from its own passes
    (tasks/pretraining_metrics.py)."""
    group = default_group() if group == "default" else group
    model = getattr(model, "module", model)  # a DeepSpeed engine / DDP wrapper: the model inside
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        on_model = (_on_device(batch, param.device, param.dtype) for batch in islice(batches, max_batches))
        parts = [batch_metrics(model, *pretraining_encode(model, batch), batch)
                 for batch in plan_batches(on_model, seed)]
    finally:
        model.train(was_training)
    return reduce_batches(parts, group)


def plan_batches(batches: Iterable[Mapping], seed: int = 0) -> Iterator[dict]:
    """Each batch with what its ITM negatives read: "negative_shift" (negative_shift's draws from
    `seed`, in batch order) and "image_keys" (its "index", else positions unique across batches)."""
    generator = torch.Generator().manual_seed(seed)
    offset = 0
    for batch in batches:
        size, device = batch["image"].shape[0], batch["image"].device
        keys = batch["index"].to(device) if "index" in batch else torch.arange(offset, offset + size, device=device)
        offset += size
        yield dict(batch, image_keys=keys, negative_shift=negative_shift(size, generator))


def has_mlm(batch: Mapping) -> bool:
    return "mlm_ids" in batch and "mlm_labels" in batch


def pretraining_encode(model, batch: Mapping) -> tuple:
    """The final-normed states of a planned batch's encoder calls: image, text (the dual encoder),
    the fused positives, the fused rotated negatives (None without a shift) and the fused MLM rows
    (None without MLM labels)."""
    backbone, images = model.backbone, batch["image"]
    ids, mask, shift = batch["text_ids"], batch["text_mask"], batch["negative_shift"]
    return (backbone.encode_image(images), backbone.encode_text(ids, mask), backbone.encode_pair(ids, mask, images),
            backbone.encode_pair(ids, mask, images.roll(shift, 0)) if shift else None,
            backbone.encode_pair(batch["mlm_ids"], mask, images) if has_mlm(batch) else None)


def batch_metrics(model, image, text, positive, negative, mlm, batch: Mapping) -> dict:
    """One planned batch's part of the metrics, from pretraining_encode's states: the ITC features
    of the image and text CLS, the image keys, and counts [ITM positives right, positives, negatives
    right, negatives, MLM right, MLM tokens]. Negatives whose image is the caption's own picture
    (several captions of one image) are not counted."""
    image_feats, text_feats = model.itc(image[:, 0], text[:, 0])
    keys, shift = batch["image_keys"], batch["negative_shift"]
    counts = torch.zeros(6, dtype=torch.float64)
    counts[:2] = torch.tensor([(_match_logits(model, positive).argmax(-1) == 1).sum().item(), positive.shape[0]])
    valid = keys != keys.roll(shift, 0)
    if shift and negative is not None and valid.any():
        right = (_match_logits(model, negative[valid]).argmax(-1) == 0).sum().item()
        counts[2:4] = torch.tensor([right, int(valid.sum())])
    if mlm is not None and has_mlm(batch):
        counts[4:] = _mlm_counts(model, mlm[:, :batch["mlm_ids"].shape[1]], batch["mlm_labels"])  # text first
    return {"image_feats": image_feats.float(), "text_feats": text_feats.float(), "image_keys": keys,
            "counts": counts.to(image_feats.device)}


def reduce_batches(parts: list[dict], group) -> dict[str, float]:
    """The metrics from batch_metrics' parts of this rank's batches, over every rank of `group`."""
    if not parts:
        raise ValueError("evaluate_pretraining: no batches")
    local = {name: torch.cat([part[name] for part in parts]) for name in ("image_feats", "text_feats", "image_keys")}
    local["counts"] = sum(part["counts"] for part in parts)
    return _reduce(local, group)


def _on_device(batch: Mapping, device, dtype) -> dict:
    """The batch's images as the model takes them (uint8 or normalised; bf16 models take bf16), its
    text and index on the model's device."""
    out = dict(batch, image=model_pixels(batch["image"], device, dtype))
    out.update({name: batch[name].to(device) for name in ("text_ids", "text_mask", "mlm_ids", "mlm_labels", "index")
                if name in batch})
    return out


def _match_logits(model, fused: torch.Tensor) -> torch.Tensor:
    """[B, 2] logits (index 1 = "matches") from the fused encoder's pooled first token."""
    return model.itm_head(model.pooler(fused))


def _mlm_counts(model, hidden, labels) -> torch.Tensor:
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
