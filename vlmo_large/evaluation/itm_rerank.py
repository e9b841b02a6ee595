"""ITM re-ranking of dual-encoder retrieval: each query's k best candidates by cosine similarity go
through the fused encoder and the ITM head, and are re-ordered by the "match" logit; the candidates
after them keep the dual encoder's order (docs/MODEL.md section 8). R@k is reported as "tr_r1_itm",
..., next to the dual encoder's "tr_r1".

Ties count against the gold item, as evaluation/retrieval.py documents: on one list whose first k
entries score their ITM logit shifted above every cosine (cosines lie in [-1, 1]), hits_at_k gives
the re-ranked R@k, and is exact for the same list length topk_retrieval_metrics uses.
"""
from __future__ import annotations

import torch

from vlmo_large.evaluation.topk_retrieval import KS, GoldPairs, hits_at_k, topk_both_ways


@torch.no_grad()
def itm_match_scores(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                     image_index: torch.Tensor, text_index: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[P] float32 ITM "match" logits of the pairs (images[image_index[p]], text p's ids) through the
    fused encoder, `batch_size` pairs at a time (images and texts on any device; moved to the model's)."""
    param = next(model.parameters())
    scores = []
    for start in range(0, image_index.shape[0], batch_size):
        pick_i, pick_t = image_index[start:start + batch_size], text_index[start:start + batch_size]
        hidden = model.backbone.encode_pair(text_ids[pick_t].to(param.device), text_mask[pick_t].to(param.device),
                                            images[pick_i].to(param.device, param.dtype), keep=1)
        scores.append(model.itm_head(model.pooler(hidden))[:, 1].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def _reranked_hits(sims: torch.Tensor, gold: torch.Tensor, itm: torch.Tensor, rerank_k: int,
                   ks) -> dict[int, torch.Tensor]:
    """hits_at_k over lists whose first rerank_k entries are ordered by their ITM logits (`itm`
    [queries, rerank_k]), shifted above every cosine, and whose rest keep their cosines."""
    scores = sims.clone()
    if rerank_k:
        scores[:, :rerank_k] = itm - itm.min() + 2.0
    return hits_at_k(scores, gold, ks)


@torch.no_grad()
def itm_reranked_metrics(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                         image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image, rerank_k: int,
                         ks: tuple[int, ...] = KS, groups: torch.Tensor | None = None,
                         batch_size: int = 64) -> dict[str, float]:
    """{"tr_r1_itm", ..., "ir_r10_itm"}: R@k after ITM re-ranks each query's `rerank_k` best
    candidates by the dual encoder's features (image_feats [N, D], text_feats [M, D]; images
    [N, 3, H, W], text_ids / text_mask [M, T] the same items; text_to_image and groups as
    retrieval.retrieval_metrics). Costs (N + M) * rerank_k fused passes."""
    model = getattr(model, "module", model)
    num_images, num_texts = image_feats.shape[0], text_feats.shape[0]
    gold = GoldPairs(torch.as_tensor(text_to_image).cpu(), num_images, None if groups is None else groups.cpu())
    k_texts = min(max(rerank_k, max(ks) + gold.most_gold_texts()), num_texts)
    k_images = min(max(rerank_k, max(ks) + gold.most_gold_images()), num_images)
    (tr_sims, tr_texts), (ir_sims, ir_images) = (tuple(t.cpu() for t in lists) for lists in
                                                 topk_both_ways(image_feats, text_feats, k_texts, k_images))
    image_ids = torch.arange(num_images)[:, None].expand_as(tr_texts)
    text_ids_of_list = torch.arange(num_texts)[:, None].expand_as(ir_images)
    r_texts, r_images = min(rerank_k, k_texts), min(rerank_k, k_images)
    tr_itm = itm_match_scores(model, images, text_ids, text_mask, image_ids[:, :r_texts].flatten(),
                              tr_texts[:, :r_texts].flatten(), batch_size).view(num_images, r_texts)
    ir_itm = itm_match_scores(model, images, text_ids, text_mask, ir_images[:, :r_images].flatten(),
                              text_ids_of_list[:, :r_images].flatten(), batch_size).view(num_texts, r_images)
    tr = _reranked_hits(tr_sims, gold.is_gold(image_ids, tr_texts), tr_itm, r_texts, ks)
    ir = _reranked_hits(ir_sims, gold.is_gold(ir_images, text_ids_of_list), ir_itm, r_images, ks)
    return {f"{name}_r{k}_itm": hits[k].float().mean().item() for name, hits in (("tr", tr), ("ir", ir)) for k in ks}
