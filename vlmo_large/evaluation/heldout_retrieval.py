"""Zero-shot retrieval on a held-out split (images in shards, every caption and the gold mapping in
a JSON: {"images": keys, "texts": captions, "txt2img": [...]}), as written by
`tools/make_shards.py pairs ... --heldout N` (or the synthetic dataset). Identical caption strings
count as the same gold text. rerank_k > 0 adds ITM re-ranking of each query's top k
(itm_rerank.py: "tr_r1_itm", ... next to "tr_r1").

    metrics, feats = heldout_retrieval(model, split, tokenizer, image_size=64, max_text_len=32)
"""
from __future__ import annotations

import json

import torch

from vlmo_large.evaluation.itm_rerank import itm_reranked_metrics
from vlmo_large.evaluation.retrieval import caption_groups, chance_r_at_1, retrieval_metrics


@torch.no_grad()
def heldout_retrieval(model, split: dict, tokenizer, image_size: int, max_text_len: int, batch_size: int = 64,
                      rerank_k: int = 0):
    """split: {"shards": pattern, "json": path}. Returns (metrics, (images, image_feats, text_feats, gold))."""
    from vlmo_large.data import build_loader

    with open(split["json"]) as f:
        gold = json.load(f)
    was_training = model.training
    model.eval()
    loader = build_loader("image_text", split["shards"], batch_size, tokenizer=tokenizer, image_size=image_size,
                          max_text_len=max_text_len, train=False, drop_last=False)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    images, keys = [], []
    for batch in loader:
        images.append(batch["image"])
        keys += list(batch["keys"])
    images = torch.cat(images)
    order = [keys.index(k) for k in gold["images"]]  # features in the JSON's image order
    images = images[order]
    image_feats, text_feats, all_ids, all_mask = [], [], [], []
    for start in range(0, len(images), batch_size):
        image_cls = model.backbone.encode_image(images[start:start + batch_size].to(device, dtype))[:, 0]
        image_feats.append(model.itc.embed_image(image_cls).float())
    for start in range(0, len(gold["texts"]), batch_size):
        ids, mask = tokenizer.encode_batch(gold["texts"][start:start + batch_size], max_text_len)
        ids, mask = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)
        all_ids.append(ids)
        all_mask.append(mask)
        text_feats.append(model.itc.embed_text(model.backbone.encode_text(ids, mask)[:, 0]).float())
    image_feats, text_feats = torch.cat(image_feats), torch.cat(text_feats)
    text_to_image = torch.as_tensor(gold["txt2img"], device=image_feats.device)
    metrics = retrieval_metrics(image_feats, text_feats, text_to_image, texts=gold["texts"])
    metrics["chance_r1"] = chance_r_at_1(len(images))
    if rerank_k:
        metrics.update(itm_reranked_metrics(model, images, torch.cat(all_ids), torch.cat(all_mask), image_feats,
                                            text_feats, text_to_image, rerank_k, groups=caption_groups(gold["texts"]),
                                            batch_size=batch_size))
    model.train(was_training)
    return metrics, (images, image_feats, text_feats, text_to_image)
