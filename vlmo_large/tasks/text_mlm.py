"""Stage 2, masked language modeling on text alone (the language expert in every layer)."""
from __future__ import annotations

from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.losses import mlm_head_flops, mlm_loss
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

    def forward(self, model, batch: dict, ctx: StepContext = StepContext()) -> dict:
        return text_mlm_losses(model, batch, ctx.mlm_slots)

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        return mlm_head_flops(cfg, batch)


def text_mlm_losses(model, batch: dict, mlm_slots: int | None = None) -> dict:
    """MLM on the text encoder's states. mlm_slots: see losses.mlm_loss."""
    (text_pass,) = TextMaskedLanguageModeling.passes
    hidden = model.backbone.encode_text(batch["mlm_ids"], batch["text_mask"], text_pass.vl_branch,
                                        text_pass.kept(batch["mlm_ids"].shape[1]))
    loss = mlm_loss(model.mlm_head, hidden, batch["mlm_labels"], mlm_slots)
    return {"loss": loss, "mlm": loss}
