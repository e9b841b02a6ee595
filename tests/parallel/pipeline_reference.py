"""The single-process reference of one pretraining step: plain VLMo, its own encoders, torch AdamW.

Same micro-batches, loss definitions, hard-negative sampler (same seed), gradient clipping and
optimizer as the pipeline worker; unused trainable parameters get zero gradients as in DeepSpeed.
"""
import torch
from safetensors.torch import load_file

from tests.parallel.pipeline_worker import CLIP, MICRO_BATCHES, OPTIMIZER, stage_batches
from vlmo_large.model import build_model
from vlmo_large.parallel.pipeline_losses import (mim_loss, mlm_loss, patch_pixel_targets, stage3_terms,
                                                 total_loss)
from vlmo_large.parallel.pipeline_negatives import fused_inputs, sample_hard_negatives
from vlmo_large.parallel.pipeline_weights import trainable


def stage3(model, mb, generator):
    bb, B = model.backbone, len(mb["text_ids"])
    images, ids, mask = mb["image"], mb["text_ids"], mb["text_mask"]
    image, image_vl = bb.encode_image(images, vl_branch=True)
    text, text_vl = bb.encode_text(ids, mask, vl_branch=True)
    image_feat, text_feat = model.itc(image[:, 0], text[:, 0])
    image_vl_feat, text_vl_feat = model.itc_vl(image_vl[:, 0], text_vl[:, 0])
    negatives = sample_hard_negatives(image_feat, text_feat, model.itc.logit_scale, image_feat, text_feat, 0,
                                      generator)
    pair_ids, pair_mask, pair_images, itm_labels = fused_inputs(images, ids, mask, mb["mlm_ids"], images, ids,
                                                                mask, *negatives)
    pair = bb.encode_pair(pair_ids, pair_mask, pair_images)
    outputs = (image_feat, text_feat, model.itc.logit_scale, image_vl_feat, text_vl_feat, model.itc_vl.logit_scale,
               model.itm_head(model.pooler(pair[:3 * B])), model.mlm_head(pair[3 * B:, :ids.shape[1]]))
    return stage3_terms(outputs, (mb["mlm_labels"], itm_labels))


def stage1(model, mb, generator):
    mask = mb["mim_mask"].flatten(1)
    hidden = model.backbone.encode_image(mb["image"], mim_mask=mask, mask_token=model.mim_head.mask_token)
    target = patch_pixel_targets(mb["image"], model.cfg.patch_size)
    return {"mim": mim_loss(model.mim_head(hidden[:, 1:]), mask, target)}


def stage2(model, mb, generator):
    hidden = model.backbone.encode_text(mb["mlm_ids"], mb["text_mask"])
    return {"mlm": mlm_loss(model.mlm_head(hidden), mb["mlm_labels"])}


def reference_step(weights_path: str, stage: int):
    """-> (losses averaged over micro-batches, state dict after one optimizer step)."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    model.load_state_dict(load_file(weights_path))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name, stage))
        if p.requires_grad:
            params.append(p)
    generator = torch.Generator().manual_seed(0)
    run = {1: stage1, 2: stage2, 3: stage3}[stage]
    sums = {}
    for mb in stage_batches(model.cfg, stage):
        terms = run(model, mb, generator)
        (total_loss(terms) / MICRO_BATCHES).backward()
        for name, value in dict(terms, loss=total_loss(terms)).items():
            sums[name] = sums.get(name, 0.0) + value.item() / MICRO_BATCHES
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
    assert norm > CLIP, "the step should clip, so that the global gradient norm is tested too"
    torch.optim.AdamW(params, **OPTIMIZER).step()
    return sums, {k: v.detach().clone() for k, v in model.state_dict().items()}
