"""Image-text retrieval fine-tuning (COCO, Flickr30k): the dual encoder (image-only and text-only
passes, vision and language experts) with the pretrained final-layer ITC heads, trained with the
global contrastive loss (docs/MODEL.md section 8). Held out: R@1/5/10 both ways; ITM re-ranking of
each query's top k is evaluation/itm_rerank.py (task.rerank_k)."""
from __future__ import annotations

from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.losses import contrastive_loss
from vlmo_large.tasks.passes import PassInput
from vlmo_large.tasks.pretraining_metrics import PretrainingMetrics
from vlmo_large.tasks.registry import register


@register
class Retrieval(PretrainingMetrics, Task):
    name = "retrieval"
    data_kind = "image_text"
    passes = (EncoderPass("image", keep="cls"), EncoderPass("text", keep="cls"))  # ITC reads CLS only
    terms = ("itc", "logit_scale")
    min_global_batch = 2  # a contrastive loss needs another sample as the negative
    retrieval = True

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        return [PassInput(image=batch["image"]), PassInput(ids=batch["text_ids"], mask=batch["text_mask"])]

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        """Global ITC over ctx.group (the data-parallel group) on the final image and text CLS."""
        image, text = outputs
        loss, _, _ = contrastive_loss(*model.itc(image.x[:, 0], text.x[:, 0]), model.itc.logit_scale, ctx.group)
        return {"loss": loss, "itc": loss, "logit_scale": model.itc.logit_scale.detach().exp().reshape(())}

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        D, B = cfg.embed_dim, batch["text_mask"].shape[0]
        return float(2 * B * 2 * D * D + 2 * 2 * B * (B * data_parallel) * D)  # projections, both logit matrices
