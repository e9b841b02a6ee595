"""Image-text retrieval recall by exhaustive cosine search (docs/MODEL.md section 6).

TR@k (text retrieval, image query): some gold caption of the image is among its k best texts.
IR@k (image retrieval, text query): the caption's gold image is among its k best images.
Ties count AGAINST the gold item (a candidate scoring exactly as high as the gold ranks ahead of
it), and NaN similarities rank last, so collapsed or broken features score ~0, never 100%.
Values are fractions in [0, 1]. Given the caption strings, identical captions are one gold text.
R@k comes from chunked top-k lists (topk_retrieval.py: never the whole images x texts matrix); the
rank functions below give the gold item's full rank, for the retrieval-examples figure.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from vlmo_large.evaluation.topk_retrieval import KS, topk_retrieval_metrics


def chance_r_at_1(num_images: int) -> float:
    """Expected R@1 of a random ranking: 1/N for IR@1, and also for TR@1 averaged over images
    (an image with c of the M captions is hit with probability c/M, and the mean of c is M/N)."""
    return 1.0 / num_images


def similarities(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [images, texts], float32; NaN -> -inf (ranks last)."""
    sims = F.normalize(image_feats.float(), dim=-1) @ F.normalize(text_feats.float(), dim=-1).T
    return torch.nan_to_num(sims, nan=float("-inf"))


def caption_groups(texts: Sequence[str]) -> torch.Tensor:
    """[M] id per caption, the same for identical strings (the index of the string's first use)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(t, j) for j, t in enumerate(texts)], dtype=torch.long)


def _image_has_caption(text_to_image, groups, num_images: int) -> torch.Tensor:
    """[images, M] bool: image i has a caption identical to caption j (columns by group id)."""
    table = torch.zeros(num_images, len(groups), dtype=torch.bool, device=text_to_image.device)
    table[text_to_image, groups] = True
    return table


def text_retrieval_ranks(image_feats, text_feats, text_to_image, chunk: int = 1024,
                         groups: torch.Tensor | None = None) -> torch.Tensor:
    """For each image, the 0-based rank of its best gold caption among all texts. `groups`
    (caption_groups): a caption identical to one of the image's counts as gold too."""
    text_to_image = torch.as_tensor(text_to_image, device=image_feats.device)
    table = None if groups is None else _image_has_caption(text_to_image, groups.to(text_to_image.device),
                                                           image_feats.shape[0])
    ranks = []
    for start in range(0, image_feats.shape[0], chunk):
        sims = similarities(image_feats[start:start + chunk], text_feats)
        ids = torch.arange(start, start + sims.shape[0], device=sims.device)
        gold = text_to_image[None, :] == ids[:, None] if table is None else table[ids][:, groups]
        best_gold = sims.masked_fill(~gold, float("-inf")).amax(1, keepdim=True)
        ranks.append(((sims >= best_gold) & ~gold).sum(1))
    return torch.cat(ranks)


def image_retrieval_ranks(image_feats, text_feats, text_to_image, chunk: int = 1024,
                          groups: torch.Tensor | None = None) -> torch.Tensor:
    """For each caption, the 0-based rank of its gold image among all images. `groups`: every image
    with a caption identical to this one is a gold image (the best of them counts)."""
    text_to_image = torch.as_tensor(text_to_image, device=image_feats.device)
    table = None if groups is None else _image_has_caption(text_to_image, groups.to(text_to_image.device),
                                                           image_feats.shape[0])
    ranks = []
    for start in range(0, text_feats.shape[0], chunk):
        sims = similarities(image_feats, text_feats[start:start + chunk]).T  # [texts, images]
        gold_ids = text_to_image[start:start + chunk]
        if table is None:
            gold = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, gold_ids[:, None], True)
        else:
            gold = table[:, groups[start:start + chunk]].T
        best_gold = sims.masked_fill(~gold, float("-inf")).amax(1, keepdim=True)
        ranks.append(((sims >= best_gold) & ~gold).sum(1))
    return torch.cat(ranks)


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image,
                      ks: tuple[int, ...] = KS, texts: Sequence[str] | None = None) -> dict[str, float]:
    """{"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"} for features [N, D] and [M, D];
    `text_to_image[j]` is the index of caption j's image (several captions per image allowed;
    every image needs at least one). `texts` (the M caption strings): an identical caption string
    is the same gold text, whichever image it was written for (with repeated captions such as
    "a dog", the ceiling would otherwise be far below 100%)."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_feats.device)
    num_images = image_feats.shape[0]
    if text_to_image.shape != (text_feats.shape[0],):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({text_feats.shape[0]},)")
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    captioned = torch.bincount(text_to_image, minlength=num_images) > 0
    if not bool(captioned.all()):
        raise ValueError(f"{int((~captioned).sum())} image(s) have no caption; TR@k is undefined for them")
    if texts is not None and len(texts) != text_feats.shape[0]:
        raise ValueError(f"{len(texts)} caption strings for {text_feats.shape[0]} text features")
    groups = None if texts is None else caption_groups(texts)
    return topk_retrieval_metrics(image_feats, text_feats, text_to_image, ks, groups)


def top_texts(image_feats: torch.Tensor, text_feats: torch.Tensor, k: int):
    """(scores, text indices) of each image's k best captions, best first."""
    sims = similarities(image_feats, text_feats)
    return sims.topk(min(k, sims.shape[1]), dim=1)
