"""Retrieval at scale: each query's top-k candidates by cosine similarity, computed block by block
(never the whole images x texts matrix), and R@k in both directions from those top-k lists.

One pass over [image chunk x text chunk] blocks feeds both directions: the block's rows update the
images' running top-k over texts, its columns the texts' running top-k over images. Order of a
list: score descending, ties by the lower candidate index (whatever the chunk sizes, so the lists
equal those of the full matrix sorted stably). NaN similarities count as -inf (last).

R@k counts ties AGAINST the gold item, as evaluation/retrieval.py documents: a query is a hit at k
when fewer than k non-gold candidates score at least as high as its best gold candidate. That
needs no full ranking: with G the most gold candidates any query has, a top-(K + G) list (K the
largest k) holds the K best non-gold scores and, if it scores above them, the best gold one, so
the metric is exact and does not depend on the order of tied candidates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def _normalized(feats: torch.Tensor) -> torch.Tensor:
    """Unit rows, float32; a row with any NaN or inf becomes all NaN (_block_scores reads column 0)."""
    unit = F.normalize(feats.float(), dim=-1)
    return unit.masked_fill(~unit.isfinite().all(1, keepdim=True), float("nan"))


def _block_scores(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Cosines of unit rows; a NaN row (a broken feature) scores -inf against everything. Finite
    unit vectors give finite products, so only the broken rows and columns need fixing."""
    scores = left @ right.T
    broken_left, broken_right = left[:, 0].isnan(), right[:, 0].isnan()  # _normalized's NaN rows
    if bool(broken_left.any()) or bool(broken_right.any()):
        scores[broken_left] = float("-inf")
        scores[:, broken_right] = float("-inf")
    return scores


def _stable_order(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows reordered by value descending, then index ascending."""
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), indices.gather(1, order)


def _block_topk(scores: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best columns (global index = column + offset), ties by the lower index. topk
    picks among values tied at the k-th place arbitrarily: a row whose (k+1)-th value equals its
    k-th had a choice, and is redone with a stable sort (rare with real features)."""
    k = min(k, scores.shape[1])
    values, indices = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    ambiguous = torch.empty(0, dtype=torch.long)
    if values.shape[1] > k:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero().flatten()
        values, indices = values[:, :k], indices[:, :k]
    if ambiguous.numel():
        order = scores[ambiguous].argsort(dim=1, descending=True, stable=True)[:, :k]
        indices[ambiguous] = order
        values[ambiguous] = scores[ambiguous].gather(1, order)
    values, indices = _stable_order(values, indices)
    return values, indices + offset


def _merge(running, new, k: int):
    """Two (values, indices) lists per row -> the best k, ties by the lower index."""
    if running is None:
        return new
    values, indices = _stable_order(torch.cat([running[0], new[0]], 1), torch.cat([running[1], new[1]], 1))
    return values[:, :k], indices[:, :k]


def topk_both_ways(image_feats: torch.Tensor, text_feats: torch.Tensor, k_texts: int, k_images: int,
                   image_chunk: int = 1024, text_chunk: int = 25000):
    """((scores, text indices) [N, k_texts] of each image's best texts,
        (scores, image indices) [M, k_images] of each text's best images), by cosine similarity.
    Memory: one [image_chunk, text_chunk] block at a time plus the lists."""
    images, texts = _normalized(image_feats), _normalized(text_feats)
    per_image, per_text = [], [None] * ((texts.shape[0] + text_chunk - 1) // text_chunk)
    for i0 in range(0, images.shape[0], image_chunk):
        running = None
        for c, t0 in enumerate(range(0, texts.shape[0], text_chunk)):
            block = _block_scores(images[i0:i0 + image_chunk], texts[t0:t0 + text_chunk])
            running = _merge(running, _block_topk(block, k_texts, t0), k_texts)
            per_text[c] = _merge(per_text[c], _block_topk(block.T, k_images, i0), k_images)
        per_image.append(running)
    image_lists = tuple(torch.cat(parts) for parts in zip(*per_image))
    text_lists = tuple(torch.cat(parts) for parts in zip(*per_text))
    return image_lists, text_lists


class GoldPairs:
    """Which (image, caption) pairs are gold, without an images x captions table: the set of
    (image, caption group) keys. `groups[j]`: caption j's group (retrieval.caption_groups: identical
    strings share one; default: every caption its own), so a caption identical to one of an image's
    is gold for it too."""

    def __init__(self, text_to_image: torch.Tensor, num_images: int, groups: torch.Tensor | None = None):
        self.text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
        num_texts = self.text_to_image.shape[0]
        self.groups = torch.arange(num_texts) if groups is None else torch.as_tensor(groups, dtype=torch.long)
        self.num_texts, self.num_images = num_texts, num_images
        self.keys = torch.unique(self.text_to_image * num_texts + self.groups)  # sorted

    def is_gold(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return torch.isin(images * self.num_texts + self.groups[texts], self.keys)

    def most_gold_texts(self) -> int:
        """The most captions any image has as gold (its groups' sizes added up)."""
        group_size = torch.bincount(self.groups, minlength=self.num_texts)
        image_of_key, group_of_key = self.keys // self.num_texts, self.keys % self.num_texts
        return int(torch.bincount(image_of_key, weights=group_size[group_of_key].double(),
                                  minlength=self.num_images).max())

    def most_gold_images(self) -> int:
        """The most images any caption has as gold (the images holding a caption of its group)."""
        return int(torch.bincount(self.keys % self.num_texts, minlength=self.num_texts).max())


def hits_at_k(scores: torch.Tensor, candidates_are_gold: torch.Tensor, ks) -> dict[int, torch.Tensor]:
    """{k: [queries] bool} from each query's top list (scores descending and its gold mask, both
    [queries, L]): a hit when the list holds a gold candidate and fewer than k non-gold ones score
    at least as high as the best of them. Exact when L >= max(ks) + the query's gold count, or L
    is every candidate: a gold candidate outside the list scores no higher than the best inside,
    and a non-gold one outside can only tie a best gold score that is the list's last, when the
    list's own K non-gold ones already make it a miss."""
    gold = candidates_are_gold
    best_gold = torch.where(gold, scores, torch.tensor(float("-inf"), dtype=scores.dtype)).amax(1, keepdim=True)
    ahead = ((scores >= best_gold) & ~gold).sum(1)
    has_gold = gold.any(1)
    return {k: has_gold & (ahead < k) for k in ks}


def topk_retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image,
                           ks: tuple[int, ...] = KS, groups: torch.Tensor | None = None,
                           image_chunk: int = 1024, text_chunk: int = 25000) -> dict[str, float]:
    """{"tr_r1", ..., "ir_r10"} (fractions) for features [N, D], [M, D] and `text_to_image[j]`, the
    image of caption j (COCO: 5 per image); `groups` as GoldPairs. Inputs are checked by the
    caller (retrieval.retrieval_metrics)."""
    gold = GoldPairs(torch.as_tensor(text_to_image).cpu(), image_feats.shape[0],
                     None if groups is None else groups.cpu())
    top = max(ks)
    k_texts = min(top + gold.most_gold_texts(), text_feats.shape[0])
    k_images = min(top + gold.most_gold_images(), image_feats.shape[0])
    (tr_scores, tr_texts), (ir_scores, ir_images) = topk_both_ways(image_feats, text_feats, k_texts, k_images,
                                                                   image_chunk, text_chunk)
    tr_scores, tr_texts, ir_scores, ir_images = (t.cpu() for t in (tr_scores, tr_texts, ir_scores, ir_images))
    image_ids = torch.arange(image_feats.shape[0])[:, None].expand_as(tr_texts)
    text_ids = torch.arange(text_feats.shape[0])[:, None].expand_as(ir_images)
    tr = hits_at_k(tr_scores, gold.is_gold(image_ids, tr_texts), ks)
    ir = hits_at_k(ir_scores, gold.is_gold(ir_images, text_ids), ks)
    metrics = {}
    for name, hits in (("tr", tr), ("ir", ir)):
        for k in ks:
            metrics[f"{name}_r{k}"] = hits[k].float().mean().item()
    return metrics
