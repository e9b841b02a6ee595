"""Image-text retrieval recall by exhaustive cosine search (spec section 6).

TR@k (text retrieval, image query): some gold caption of the image is among its k best texts.
IR@k (image retrieval, text query): the caption's gold image is among its k best images.
Ties count AGAINST the gold item (a candidate scoring exactly as high as the gold ranks ahead of
it), and NaN similarities rank last, so collapsed or broken features score ~0, never 100%.
Values are fractions in [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def chance_r_at_1(num_images: int) -> float:
    """Expected R@1 of a random ranking: 1/N for IR@1, and also for TR@1 averaged over images
    (an image with c of the M captions is hit with probability c/M, and the mean of c is M/N)."""
    return 1.0 / num_images


def similarities(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [images, texts], float32; NaN -> -inf (ranks last)."""
    sims = F.normalize(image_feats.float(), dim=-1) @ F.normalize(text_feats.float(), dim=-1).T
    return torch.nan_to_num(sims, nan=float("-inf"))


def text_retrieval_ranks(image_feats, text_feats, text_to_image, chunk: int = 1024) -> torch.Tensor:
    """For each image, the 0-based rank of its best gold caption among all texts."""
    text_to_image = torch.as_tensor(text_to_image, device=image_feats.device)
    ranks = []
    for start in range(0, image_feats.shape[0], chunk):
        sims = similarities(image_feats[start:start + chunk], text_feats)
        ids = torch.arange(start, start + sims.shape[0], device=sims.device)
        gold = text_to_image[None, :] == ids[:, None]
        best_gold = sims.masked_fill(~gold, float("-inf")).amax(1, keepdim=True)
        ranks.append(((sims >= best_gold) & ~gold).sum(1))
    return torch.cat(ranks)


def image_retrieval_ranks(image_feats, text_feats, text_to_image, chunk: int = 1024) -> torch.Tensor:
    """For each caption, the 0-based rank of its gold image among all images."""
    text_to_image = torch.as_tensor(text_to_image, device=image_feats.device)
    ranks = []
    for start in range(0, text_feats.shape[0], chunk):
        sims = similarities(image_feats, text_feats[start:start + chunk]).T  # [texts, images]
        gold_ids = text_to_image[start:start + chunk]
        gold_score = sims.gather(1, gold_ids[:, None])
        others = torch.ones_like(sims, dtype=torch.bool).scatter_(1, gold_ids[:, None], False)
        ranks.append(((sims >= gold_score) & others).sum(1))
    return torch.cat(ranks)


def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image,
                      ks: tuple[int, ...] = KS) -> dict[str, float]:
    """{"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"} for features [N, D] and [M, D];
    `text_to_image[j]` is the index of caption j's image (several captions per image allowed;
    every image needs at least one)."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_feats.device)
    num_images = image_feats.shape[0]
    if text_to_image.shape != (text_feats.shape[0],):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({text_feats.shape[0]},)")
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    captioned = torch.bincount(text_to_image, minlength=num_images) > 0
    if not bool(captioned.all()):
        raise ValueError(f"{int((~captioned).sum())} image(s) have no caption; TR@k is undefined for them")
    tr = text_retrieval_ranks(image_feats, text_feats, text_to_image)
    ir = image_retrieval_ranks(image_feats, text_feats, text_to_image)
    metrics = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in ks:
            metrics[f"{name}_r{k}"] = (ranks < k).float().mean().item()
    return metrics


def top_texts(image_feats: torch.Tensor, text_feats: torch.Tensor, k: int):
    """(scores, text indices) of each image's k best captions, best first."""
    sims = similarities(image_feats, text_feats)
    return sims.topk(min(k, sims.shape[1]), dim=1)
