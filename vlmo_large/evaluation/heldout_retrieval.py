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
import torch.distributed as dist

from vlmo_large.evaluation.gather import gather_rows
from vlmo_large.evaluation.itm_rerank import itm_reranked_metrics
from vlmo_large.evaluation.retrieval import caption_groups, chance_r_at_1, retrieval_metrics


@torch.no_grad()
def heldout_retrieval(model, split: dict, tokenizer, image_size: int, max_text_len: int, batch_size: int = 64,
                      rerank_k: int = 0, sharded: bool = False):
    """split: {"shards": pattern, "json": path}. Returns (metrics, (images, image_feats, text_feats, gold)).
    sharded: every rank of the world (one whole model each: no tensor parallelism) encodes its
    contiguous share of the images and captions, and the features are gathered in order."""
    from vlmo_large.data import build_loader

    with open(split["json"]) as f:
        gold = json.load(f)
    was_training = model.training
    model.eval()
    loader = build_loader("image_text", split["shards"], batch_size, tokenizer=tokenizer, image_size=image_size,
                          max_text_len=max_text_len, train=False, drop_last=False, rank=0, world_size=1)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    images, keys = [], []
    for batch in loader:
        images.append(batch["image"])
        keys += list(batch["keys"])
    images = torch.cat(images)
    order = [keys.index(k) for k in gold["images"]]  # features in the JSON's image order
    images = images[order]
    ids, mask = tokenizer.encode_batch(gold["texts"], max_text_len)
    all_ids, all_mask = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded and dist.is_initialized() else (0, 1)
    image_feats, text_feats = [], []
    mine = _share(len(images), rank, world)
    for start in range(mine.start, mine.stop, batch_size):
        batch = images[start:min(start + batch_size, mine.stop)].to(device, dtype)
        image_feats.append(model.itc.embed_image(model.backbone.encode_image(batch)[:, 0]).float())
    mine = _share(len(gold["texts"]), rank, world)
    for start in range(mine.start, mine.stop, batch_size):
        end = min(start + batch_size, mine.stop)
        text_cls = model.backbone.encode_text(all_ids[start:end], all_mask[start:end])[:, 0]
        text_feats.append(model.itc.embed_text(text_cls).float())
    width = model.itc.image_proj.weight.shape[0]
    image_feats, text_feats = (torch.cat(f) if f else torch.zeros(0, width, device=device)
                               for f in (image_feats, text_feats))
    if world > 1:
        image_feats, text_feats = gather_rows(image_feats), gather_rows(text_feats)
    text_to_image = torch.as_tensor(gold["txt2img"], device=image_feats.device)
    metrics = retrieval_metrics(image_feats, text_feats, text_to_image, texts=gold["texts"])
    metrics["chance_r1"] = chance_r_at_1(len(images))
    if rerank_k:
        metrics.update(itm_reranked_metrics(model, images, all_ids, all_mask, image_feats,
                                            text_feats, text_to_image, rerank_k, groups=caption_groups(gold["texts"]),
                                            batch_size=batch_size))
    model.train(was_training)
    return metrics, (images, image_feats, text_feats, text_to_image)


def _share(count: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of `count` items (in rank order, so gathering keeps the order)."""
    return slice(count * rank // world, count * (rank + 1) // world)
