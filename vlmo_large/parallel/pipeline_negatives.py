"""Global hard negatives for ITM, chosen on the host between the two pipeline passes.

The fused ITM pairs enter the pipeline at its first stage, but the ITC similarities that pick the
negatives come out of its last. So a stage-3 step runs a no-grad dual-encoder pass first
(`engine.eval_batch` in "dual" mode), the last stage samples negatives here, broadcasts their
indices along the pipeline, and the first stage builds the fused pairs from the data-parallel
gathered raw inputs. One function samples for the pipeline and for the single-process reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def sample_hard_negatives(image_feat, text_feat, logit_scale, all_image_feat, all_text_feat, offset: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local text an image index, for each local image a text index, into the global batch.

    Rows are softmax(scale * similarity) with the positive (global index offset + i) zeroed, as in
    the reference ITM.
    """
    if all_image_feat.shape[0] < 2:
        raise ValueError("hard negatives need a global micro-batch of at least 2 pairs")
    scale = logit_scale.float().exp()
    positives = torch.arange(image_feat.shape[0]) + offset
    rows = torch.arange(image_feat.shape[0])
    weights_i2t = F.softmax(scale * image_feat.float() @ all_text_feat.float().T, dim=1)
    weights_t2i = F.softmax(scale * text_feat.float() @ all_image_feat.float().T, dim=1)
    weights_i2t[rows, positives] = 0
    weights_t2i[rows, positives] = 0
    neg_image_for_text = torch.multinomial(weights_t2i.cpu(), 1, generator=generator).squeeze(1)
    neg_text_for_image = torch.multinomial(weights_i2t.cpu(), 1, generator=generator).squeeze(1)
    return neg_image_for_text, neg_text_for_image


def fused_inputs(images, ids, mask, mlm_ids, all_images, all_ids, all_mask, neg_image_for_text,
                 neg_text_for_image):
    """Inputs of the `pair` stream: 3B ITM pairs (positive, negative image, negative text), then the
    B MLM pairs; and the ITM labels (1 for the positives)."""
    B = ids.shape[0]
    neg_image_for_text = neg_image_for_text.to(images.device)
    neg_text_for_image = neg_text_for_image.to(ids.device)
    pair_ids = torch.cat([ids, ids, all_ids[neg_text_for_image], mlm_ids])
    pair_mask = torch.cat([mask, mask, all_mask[neg_text_for_image], mask])
    pair_images = torch.cat([images, all_images[neg_image_for_text], images, images])
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(ids.device)
    return pair_ids, pair_mask, pair_images, itm_labels
