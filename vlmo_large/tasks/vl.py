"""Stage 3, vision-language: ITC (final and VL-branch CLS), ITM with global hard negatives, MLM on
the fused encoder (docs/MODEL.md sections 4 and 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.losses import ITM_PAIRS, contrastive_loss, itm_labels, itm_pairs, mlm_head_flops, mlm_loss
from vlmo_large.tasks.passes import PassInput, PassOutput
from vlmo_large.tasks.pretraining_metrics import PretrainingMetrics
from vlmo_large.tasks.registry import register


@register
class VisionLanguage(PretrainingMetrics, Task):
    name = "vl"
    data_kind = "image_text"
    passes = (EncoderPass("image", vl_branch=True, keep="cls"),  # ITC reads CLS only
              EncoderPass("text", vl_branch=True, keep="cls"),
              EncoderPass("pair", copies=1 + ITM_PAIRS, keep="text"))  # the MLM rows, then the ITM pairs
    terms = ("itc", "itc_vl", "itm", "mlm", "itm_acc", "logit_scale")
    trainable = None
    min_global_batch = 2  # an ITM negative is another sample of the global batch
    probe_passes = (0, 1)  # the ITC logits pick the fused pass's hard negatives
    retrieval = True

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        """The image and text passes; with the ITC logits (probe), the fused pass: the MLM rows, then
        the 3B ITM pairs (itm_pairs: hard negatives drawn from this step's generator)."""
        unimodal = [PassInput(image=batch["image"]), PassInput(ids=batch["text_ids"], mask=batch["text_mask"])]
        if probe is None:
            return unimodal + [None]
        i2t, t2i = probe
        pairs = itm_pairs(batch, i2t, t2i, ctx.group, ctx.generator(batch["image"].device),
                          ctx.weights.itm_skip_identical_text)
        fused = PassInput(ids=torch.cat([batch["mlm_ids"], pairs["text_ids"]]),
                          mask=torch.cat([batch["text_mask"], pairs["text_mask"]]),
                          image=torch.cat([batch["image"], pairs["image"]]))
        return unimodal + [fused]

    def probe(self, model, outputs: list, batch: dict, ctx: StepContext) -> tuple:
        """This rank's rows of the global ITC logits (i2t, t2i)."""
        image, text = outputs
        _, i2t, t2i = contrastive_loss(*model.itc(image.x[:, 0], text.x[:, 0]), model.itc.logit_scale, ctx.group)
        return i2t, t2i

    def encode(self, model, indices, inputs: list) -> dict:
        """With cfg.pack_unimodal, the image and text passes as one packed pass (backbone.py)."""
        if model.cfg.pack_unimodal and tuple(indices) == self.probe_passes:
            (image, image_vl), (text, text_vl) = model.backbone.encode_image_and_text(
                inputs[0].image, inputs[1].ids, inputs[1].mask)
            return {0: PassOutput(image, image_vl), 1: PassOutput(text, text_vl)}
        return super().encode(model, indices, inputs)

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        """ITC on the final and the VL-branch CLS, MLM on the fused MLM rows, ITM on the pairs' CLS."""
        image, text, fused = outputs
        B = batch["text_ids"].shape[0]
        itc_main, _, _ = contrastive_loss(*model.itc(image.x[:, 0], text.x[:, 0]), model.itc.logit_scale, ctx.group)
        itc_vl, _, _ = contrastive_loss(*model.itc_vl(image.vl[:, 0], text.vl[:, 0]), model.itc_vl.logit_scale,
                                        ctx.group)
        mlm = mlm_loss(model.mlm_head, fused.x[:B], batch["mlm_labels"], ctx.mlm_slots)
        itm_logits = model.itm_head(model.pooler(fused.x[B:])).float()
        labels = itm_labels(B, itm_logits.device)
        itc = (itc_main + itc_vl) / 2
        itm = F.cross_entropy(itm_logits, labels)
        itm_acc = (itm_logits.argmax(-1) == labels).float().mean()
        total = ctx.weights.itc * itc + ctx.weights.itm * itm + ctx.weights.mlm * mlm
        return {"loss": total, "itc": itc, "itc_vl": itc_vl, "itm": itm, "mlm": mlm, "itm_acc": itm_acc,
                "logit_scale": model.itc.logit_scale.detach().exp().reshape(())}

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        D, B = cfg.embed_dim, batch["text_mask"].shape[0]
        itc = 2 * (2 * B * 2 * D * D + 2 * 2 * B * (B * data_parallel) * D)  # two ITC heads: projections, logits
        itm = ITM_PAIRS * B * 2 * (D * D + 2 * D)  # pooler and the 2-way head on the pairs' CLS
        return float(itc + itm) + mlm_head_flops(cfg, batch)
