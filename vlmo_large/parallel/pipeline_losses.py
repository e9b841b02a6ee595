"""Losses on the pipeline's last stage: `PipelineLoss(outputs, labels)`, called per micro-batch.

DeepSpeed's engine calls `loss_fn(head_outputs, labels)` on the last stage. The loss keeps the
terms of its last call so that the pipeline module can report them (`get_additional_losses`), and
the engine averages them over micro-batches and data-parallel ranks like the total.

Stage 3 (VLMO_SPEC section 4): total = (ITC + ITC_vl) / 2 + ITM + 0.25 * MLM, ITC over the global
(data-parallel) micro-batch with an autograd-aware gather, so each rank's loss is its rows of the
global similarity matrix and DeepSpeed's gradient average gives the gradient of the mean loss at
any world size.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from vlmo_large.parallel import state

TERMS = {"itc_itm_mlm": ("itc", "itc_vl", "itm", "mlm"), "mim": ("mim",), "text_mlm": ("mlm",), "dual": ()}
MLM_WEIGHT = 0.25


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every data-parallel rank's rows, keeping the gradient path to this rank's rows."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), 0)


def contrastive_loss(image_feat, text_feat, logit_scale, group=None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's (normalised) rows against the global micro-batch."""
    all_image, all_text = gather_rows(image_feat, group), gather_rows(text_feat, group)
    offset = 0 if group is None else dist.get_rank(group) * image_feat.shape[0]
    targets = torch.arange(image_feat.shape[0], device=image_feat.device) + offset
    scale = logit_scale.exp()
    return (F.cross_entropy(scale * image_feat @ all_text.T, targets)
            + F.cross_entropy(scale * text_feat @ all_image.T, targets)) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked tokens; `logits` hold this TP rank's slice of the vocabulary."""
    keep = labels != -100
    if not keep.any():
        return logits.sum() * 0.0
    return vocab_parallel_cross_entropy(logits[keep][:, None].float(), labels[keep][:, None]).mean()


def mim_loss(pred: torch.Tensor, mim_mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Masked patches only: MSE to normalised pixels, or cross-entropy to visual-token ids."""
    keep = mim_mask.bool()
    if target.is_floating_point():
        return F.mse_loss(pred[keep].float(), target[keep].float())
    return F.cross_entropy(pred[keep].float(), target[keep])


def patch_pixel_targets(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, patches, patch*patch*C]: each patch's pixels normalised by its own mean and variance."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)
    x = x.reshape(B, (H // patch) * (W // patch), patch * patch * C)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()


def stage3_terms(outputs, labels, group=None) -> OrderedDict:
    image, text, scale, image_vl, text_vl, scale_vl, itm_logits, mlm_logits = outputs
    mlm_labels, itm_labels = labels
    return OrderedDict(itc=contrastive_loss(image, text, scale, group),
                       itc_vl=contrastive_loss(image_vl, text_vl, scale_vl, group),
                       itm=F.cross_entropy(itm_logits.float(), itm_labels),
                       mlm=mlm_loss(mlm_logits, mlm_labels))


def total_loss(terms: OrderedDict) -> torch.Tensor:
    if "itc" in terms:
        return (terms["itc"] + terms["itc_vl"]) / 2 + terms["itm"] + MLM_WEIGHT * terms["mlm"]
    return sum(terms.values())


class PipelineLoss:
    """loss_fn of the pipeline module; `mode` is set by the module together with its layers'."""

    def __init__(self, mode: str):
        self.mode = mode
        self.terms: OrderedDict | None = None

    def __call__(self, outputs, labels):
        if self.mode == "dual":  # the no-grad pass hands its ITC features back to the host
            return [t.detach() for t in outputs]
        if self.mode == "itc_itm_mlm":
            terms = stage3_terms(outputs, labels, state.dp_group())
        elif self.mode == "mim":
            terms = OrderedDict(mim=mim_loss(outputs, *labels))
        else:
            terms = OrderedDict(mlm=mlm_loss(outputs, labels))
        self.terms = OrderedDict((k, v.detach().float()) for k, v in terms.items())
        return total_loss(terms)
