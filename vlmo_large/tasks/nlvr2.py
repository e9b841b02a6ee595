"""NLVR2 fine-tuning: one sentence, two images. Two fused passes share the text (the left image with
modality-type row 1, the right with row 2), the two pooled text CLS concatenated -> the 2-way
classifier, cross-entropy; accuracy (docs/MODEL.md section 8)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_large.errors import UserError
from vlmo_large.evaluation.gather import default_group, sum_over_ranks
from vlmo_large.model.backbone import IMAGE_ROW, SECOND_IMAGE_ROW
from vlmo_large.model.heads import nlvr2_classifier
from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.passes import PassInput
from vlmo_large.tasks.registry import register


@register
class NLVR2(Task):
    name = "nlvr2"
    data_kind = "nlvr2"
    passes = (EncoderPass("pair", keep="cls"), EncoderPass("pair", keep="cls"))  # text with the left, the right image
    terms = ("nlvr2", "nlvr2_acc")
    model_overrides = {"num_modality_types": 3}  # the right image's modality-type row

    def heads(self, cfg, options) -> dict:
        if cfg.num_modality_types <= SECOND_IMAGE_ROW:
            raise UserError(f"task 'nlvr2' needs model.num_modality_types=3 (the right image's row), got "
                            f"{cfg.num_modality_types}")
        return {"nlvr2_classifier": nlvr2_classifier(cfg.embed_dim)}

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        ids, mask = batch["text_ids"], batch["text_mask"]
        return [PassInput(ids=ids, mask=mask, image=batch["image"], modality_row=IMAGE_ROW),
                PassInput(ids=ids, mask=mask, image=batch["image2"], modality_row=SECOND_IMAGE_ROW)]

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        logits = nlvr2_logits(model, *(out.x for out in outputs))
        labels = batch["nlvr2_labels"]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(-1) == labels).float().mean()
        return {"loss": loss, "nlvr2": loss, "nlvr2_acc": accuracy}

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        D, B = cfg.embed_dim, batch["text_ids"].shape[0]
        return float(B * 2 * (2 * D * D + 2 * D * 2 * D + 2 * D * 2))  # two pooler rows, the classifier

    def heldout_batch(self, model, outputs: list, batch: dict) -> dict:
        """[statements predicted right, statements] of the batch."""
        predicted = nlvr2_logits(model, outputs[0].x, outputs[1].x).argmax(-1)
        right = (predicted == batch["nlvr2_labels"]).sum()
        return {"counts": torch.stack([right, right.new_tensor(predicted.shape[0])]).double()}

    def heldout_reduce(self, parts: list) -> dict:
        """nlvr2_acc over every rank's batches (collective over the data-parallel group)."""
        counts = sum(part["counts"] for part in parts) if parts else torch.zeros(2, dtype=torch.float64)
        right, statements = sum_over_ranks(counts, default_group()).tolist()
        return {"nlvr2_acc": right / max(statements, 1), "num_statements": statements}


def nlvr2_logits(model, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """[B, 2] float32 logits (index 1: the statement is true) from the two fused passes' final states."""
    return model.nlvr2_classifier(torch.cat([model.pooler(left), model.pooler(right)], -1)).float()
