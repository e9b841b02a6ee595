"""Stage 3, vision-language: ITC (final and VL-branch CLS), ITM with global hard negatives, MLM on
the fused encoder (docs/MODEL.md sections 4 and 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.loss_weights import LossWeights
from vlmo_large.tasks.losses import ITM_PAIRS, contrastive_loss, itm_pairs, mlm_head_flops, mlm_loss
from vlmo_large.tasks.registry import register


@register
class VisionLanguage(Task):
    name = "vl"
    data_kind = "image_text"
    passes = (EncoderPass("image", vl_branch=True, keep="cls"),  # ITC reads CLS only
              EncoderPass("text", vl_branch=True, keep="cls"),
              EncoderPass("pair", copies=1 + ITM_PAIRS, keep="text"))  # the MLM rows, then the ITM pairs
    terms = ("itc", "itc_vl", "itm", "mlm", "itm_acc", "logit_scale")
    trainable = None
    min_global_batch = 2  # an ITM negative is another sample of the global batch
    retrieval = True

    def forward(self, model, batch: dict, ctx: StepContext = StepContext()) -> dict:
        generator = ctx.generator(batch["image"].device)
        return vl_losses(model, batch, ctx.weights, ctx.group, generator, ctx.mlm_slots)

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        D, B = cfg.embed_dim, batch["text_mask"].shape[0]
        itc = 2 * (2 * B * 2 * D * D + 2 * 2 * B * (B * data_parallel) * D)  # two ITC heads: projections, logits
        itm = ITM_PAIRS * B * 2 * (D * D + 2 * D)  # pooler and the 2-way head on the pairs' CLS
        return float(itc + itm) + mlm_head_flops(cfg, batch)

    def heldout_metrics(self, model, batches: list) -> dict:
        from vlmo_large.evaluation import evaluate_pretraining  # matplotlib and friends: only when evaluating
        return evaluate_pretraining(model, batches)


def vl_losses(model, batch: dict, weights: LossWeights = LossWeights(), group=None,
              generator: torch.Generator | None = None, mlm_slots: int | None = None) -> dict:
    """The MLM pairs and the 3B ITM pairs go through the fused encoder as one batch.
    mlm_slots: see losses.mlm_loss."""
    bb = model.backbone
    image_pass, text_pass, fused_pass = VisionLanguage.passes
    B, T = batch["text_ids"].shape
    assert image_pass.vl_branch and text_pass.vl_branch and image_pass.keep == text_pass.keep == "cls"
    (image, image_vl), (text, text_vl) = bb.encode_image_and_text(batch["image"], batch["text_ids"],
                                                                  batch["text_mask"])
    itc_main, i2t, t2i = contrastive_loss(*model.itc(image[:, 0], text[:, 0]), model.itc.logit_scale, group)
    itc_vl, _, _ = contrastive_loss(*model.itc_vl(image_vl[:, 0], text_vl[:, 0]), model.itc_vl.logit_scale, group)

    pairs = itm_pairs(batch, i2t.detach(), t2i.detach(), group, generator, weights.itm_skip_identical_text)
    fused_ids = torch.cat([batch["mlm_ids"], pairs["text_ids"]])
    assert fused_ids.shape[0] == fused_pass.copies * B, "VisionLanguage.passes no longer describes the fused pass"
    fused = bb.encode_pair(fused_ids, torch.cat([batch["text_mask"], pairs["text_mask"]]),
                           torch.cat([batch["image"], pairs["image"]]), keep=fused_pass.kept(T))
    mlm = mlm_loss(model.mlm_head, fused[:B], batch["mlm_labels"], mlm_slots)
    itm_logits = model.itm_head(model.pooler(fused[B:])).float()
    return vl_loss_terms(itc_main, itc_vl, mlm, itm_logits, pairs["labels"], weights, model.itc.logit_scale)


def vl_loss_terms(itc_main, itc_vl, mlm, itm_logits, itm_labels, weights: LossWeights, logit_scale) -> dict:
    """The weighted loss and the reported terms from the heads' outputs (the pipeline's last stage
    calls this too)."""
    itc = (itc_main + itc_vl) / 2
    itm = F.cross_entropy(itm_logits, itm_labels)
    itm_acc = (itm_logits.argmax(-1) == itm_labels).float().mean()
    total = weights.itc * itc + weights.itm * itm + weights.mlm * mlm
    return {"loss": total, "itc": itc, "itc_vl": itc_vl, "itm": itm, "mlm": mlm, "itm_acc": itm_acc,
            "logit_scale": logit_scale.detach().exp().reshape(())}
