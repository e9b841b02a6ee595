"""The pipeline's loss: the tasks' losses (vlmo_large/tasks/) applied to what the last stage's layers return.

DeepSpeed's engine calls `loss_fn(outputs, labels)` on the last stage for each micro-batch. The
tasks run VLMo's encoders themselves; here the encoders are the pipeline, so this module applies
the same heads and loss functions (contrastive_loss, mlm_loss, the MIM target) to
the final-normed states of the head layer, whose modules the loss holds (`head`). The terms of the
last call are kept for `MoMEPipeline.get_additional_losses`, which DeepSpeed averages over
micro-batches and data-parallel ranks like the loss.
"""
from __future__ import annotations

from collections import OrderedDict

from vlmo_large.parallel import state
from vlmo_large.tasks.loss_weights import LossWeights
from vlmo_large.tasks.losses import contrastive_loss, masked_patch_loss, mlm_loss
from vlmo_large.tasks.registry import get_task
from vlmo_large.tasks.vl import vl_loss_terms


def mode_terms(mode: str) -> tuple[str, ...]:
    """Reported terms of a pipeline mode, "loss" aside: its task's (a training mode is named after
    its task); "dual", the no-grad ITC pass, reports none."""
    return () if mode == "dual" else get_task(mode).terms


def vl_terms(head, outputs, labels, weights: LossWeights, group, mlm_slots: int | None = None) -> dict:
    """Stage 3 from the head layer's outputs; as tasks/vl.py's vl_losses after its encoders."""
    image, text, image_vl, text_vl, pair = outputs
    mlm_labels, itm_labels = labels
    B, T = mlm_labels.shape
    itc_main, _, _ = contrastive_loss(*head.itc(image, text), head.itc.logit_scale, group)
    itc_vl, _, _ = contrastive_loss(*head.itc_vl(image_vl, text_vl), head.itc_vl.logit_scale, group)
    mlm = mlm_loss(head.mlm_head, pair[:B, :T], mlm_labels, mlm_slots)
    itm_logits = head.itm_head(head.pooler(pair[B:])).float()
    return vl_loss_terms(itc_main, itc_vl, mlm, itm_logits, itm_labels, weights, head.itc.logit_scale)


def mim_terms(head, patches, labels) -> dict:
    """Stage 1: predictions at the masked patches, against normalised pixels or token ids."""
    mask, target = labels
    loss = masked_patch_loss(head.mim_predictor(patches).float(), target, mask)
    return {"loss": loss, "mim": loss}


class PipelineLoss:
    """loss_fn of the pipeline module; `mode` is switched with the layers', `head` set on the last stage.
    mlm_slots: the MLM head's fixed positions per row (tasks/losses.py mlm_loss); None: every position."""

    def __init__(self, mode: str, weights: LossWeights = LossWeights(), mlm_slots: int | None = None):
        self.mode, self.weights, self.mlm_slots = mode, weights, mlm_slots
        self.head = None
        self.terms: OrderedDict | None = None

    def __call__(self, outputs, labels):
        group = state.dp_group()
        if self.mode == "dual":  # the no-grad pass hands the global ITC logits to the host
            _, i2t, t2i = contrastive_loss(*self.head.itc(*outputs), self.head.itc.logit_scale, group)
            return [i2t, t2i]
        if self.mode == "vl":
            terms = vl_terms(self.head, outputs, labels, self.weights, group, self.mlm_slots)
        elif self.mode == "mim":
            terms = mim_terms(self.head, outputs, labels)
        else:
            loss = mlm_loss(self.head.mlm_head, outputs, labels, self.mlm_slots)
            terms = {"loss": loss, "mlm": loss}
        self.terms = OrderedDict((k, terms[k].detach().float()) for k in mode_terms(self.mode))
        return terms["loss"]
