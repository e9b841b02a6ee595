"""Stage 1, masked image modeling: predict the masked patches (docs/MODEL.md section 5)."""
from __future__ import annotations

from vlmo_large.tasks.base import EncoderPass, StepContext, Task
from vlmo_large.tasks.losses import masked_patch_loss, normalized_pixel_targets
from vlmo_large.tasks.passes import PassInput
from vlmo_large.tasks.registry import register


@register
class MaskedImageModeling(Task):
    name = "mim"
    data_kind = "image"
    passes = (EncoderPass("image"),)
    terms = ("mim",)
    # attention (+ its norm, layer scales, relative table), the vision expert, the patch embedding,
    # the final norm and the MIM head
    trainable = (r"backbone\.patch_embed\..*", r"backbone\.blocks\.\d+\.rel_pos\.table",
                 r"backbone\.blocks\.\d+\.norm1\..*", r"backbone\.blocks\.\d+\.attn\..*",
                 r"backbone\.blocks\.\d+\.gamma_[12]",
                 r"backbone\.blocks\.\d+\.experts\.imag\..*", r"backbone\.norm\..*", r"mim_head\..*")

    def inputs(self, batch: dict, ctx: StepContext, probe=None) -> list:
        return [PassInput(image=batch["image"], mim_mask=batch["mim_mask"].bool())]

    def score(self, model, outputs: list, batch: dict, ctx: StepContext) -> dict:
        """Predict the masked patches (normalised pixels, or visual-token ids if the config's
        mim_target is "token" and the batch carries "mim_targets" [B, N])."""
        (image,) = outputs
        targets = batch["mim_targets"] if model.cfg.mim_target == "token" else \
            normalized_pixel_targets(batch["image"], model.cfg.patch_size)
        loss = masked_patch_loss(model.mim_head(image.x[:, 1:]).float(), targets, batch["mim_mask"].bool())
        return {"loss": loss, "mim": loss}

    def head_flops(self, cfg, batch: dict, data_parallel: int) -> float:
        out = cfg.patch_size ** 2 * cfg.in_chans if cfg.mim_target == "pixel" else cfg.mim_vocab_size
        return float(int(batch["mim_mask"].sum()) * 2 * cfg.embed_dim * out)

