"""Stage 2, masked language modeling on text alone (the language expert in every layer)."""
from __future__ import annotations

from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.losses import mlm_head_flops, mlm_loss
from vlmo_large.tasks.passes import PassInput
from vlmo_large.tasks.registry import register


@register
class TextMaskedLanguageModeling(Task):
    name = "text_mlm"
    data_kind = "text"
    passes = (EncoderPass("text"),)
    terms = ("mlm",)
    # text embeddings, modality embedding, language expert (+ its norm), MLM head, relative table,
    # final norm; attention stays as stage 1 left it
    trainable = (r"backbone\.text_embeddings\..*", r"backbone\.modality_embed\..*",
                 r"backbone\.blocks\.\d+\.experts\.text\..*", r"mlm_head\..*",
                 r"backbone\.blocks\.\d+\.rel_pos\.table", r"backbone\.norm\..*")

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        return [PassInput(ids=batch["mlm_ids"], mask=batch["text_mask"])]

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        """MLM on the text encoder's states. ctx.mlm_slots: see losses.mlm_loss."""
        (text,) = outputs
        loss = mlm_loss(model.mlm_head, text.x, batch["mlm_labels"], ctx.mlm_slots)
        return {"loss": loss, "mlm": loss}

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        return mlm_head_flops(cfg, batch)

