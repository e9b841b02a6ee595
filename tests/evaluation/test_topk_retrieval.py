"""Chunked top-k retrieval equals the full matrix: the top-k lists (scores and indices, ties by the
lower index) at any chunk sizes, and R@k both ways against a brute-force count in float64 (ties
against the gold item, identical captions as one gold text, NaN features last). Tie-heavy cases use
features in {-0.5, 0.5}^4: unit vectors whose cosines are exact in any summation order."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmo_large.evaluation import topk_retrieval
from vlmo_large.evaluation.retrieval import caption_groups
from vlmo_large.evaluation.topk_retrieval import topk_both_ways, topk_retrieval_metrics

KS = (1, 2, 5, 10)


def full_matrix_topk(image_feats, text_feats, k_texts: int, k_images: int):
    """The whole cosine matrix (NaN: -inf), each row and column stably sorted: ties by the lower index."""
    sims = torch.nan_to_num(F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T, nan=float("-inf"))
    rows = sims.sort(dim=1, descending=True, stable=True)
    cols = sims.T.sort(dim=1, descending=True, stable=True)
    return ((rows.values[:, :k_texts], rows.indices[:, :k_texts]),
            (cols.values[:, :k_images], cols.indices[:, :k_images]))


def tied_features(generator, rows: int) -> torch.Tensor:
    return torch.randint(0, 2, (rows, 4), generator=generator).float() - 0.5


def coco_like(generator, images: int, per_image: int = 5) -> torch.Tensor:
    """text_to_image: `per_image` captions per image, shuffled."""
    return torch.arange(images).repeat_interleave(per_image)[torch.randperm(images * per_image, generator=generator)]


def brute_force_recall(image_feats, text_feats, text_to_image, texts=None, ks=KS) -> dict:
    """Full cosine matrix in float64; a query hits at k when fewer than k non-gold candidates score
    at least its best gold one (NaN: -inf)."""
    img = image_feats.double().numpy()
    txt = text_feats.double().numpy()
    sims = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    sims = np.nan_to_num(sims, nan=-np.inf)
    owner = text_to_image.tolist()
    names = texts if texts is not None else list(range(len(owner)))
    captions_of = {i: {names[j] for j in range(len(owner)) if owner[j] == i} for i in range(len(img))}
    gold = np.array([[names[j] in captions_of[i] for j in range(len(owner))] for i in range(len(img))])
    out = {}
    for name, scores, is_gold in (("tr", sims, gold), ("ir", sims.T, gold.T)):
        best = np.where(is_gold, scores, -np.inf).max(1, keepdims=True)
        ahead = ((scores >= best) & ~is_gold).sum(1)
        for k in ks:
            out[f"{name}_r{k}"] = float(np.mean(ahead < k))
    return out


@pytest.mark.parametrize("chunks", [(1, 1), (3, 5), (7, 64), (1000, 1000)])
def test_topk_lists_equal_the_full_matrix_with_ties(chunks):
    g = torch.Generator().manual_seed(sum(chunks))
    images, texts = tied_features(g, 23), tied_features(g, 41)
    images[2, 0], texts[5, 1] = float("nan"), float("inf")  # broken features: -inf against everything
    full = full_matrix_topk(images, texts, 9, 6)
    chunked = topk_both_ways(images, texts, 9, 6, *chunks)
    for (full_scores, full_ids), (scores, ids) in zip(full, chunked):
        assert torch.equal(ids, full_ids) and torch.equal(scores, full_scores)
    # ties by the lower index: within equal scores, indices ascend
    scores, ids = chunked[0]
    same = scores[:, 1:] == scores[:, :-1]
    assert bool((ids[:, 1:] > ids[:, :-1])[same].all()) and bool(same.any())


def test_topk_lists_on_random_features():
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(37, 16, generator=g), torch.randn(90, 16, generator=g)
    (full_s, full_i), (full_s2, full_i2) = full_matrix_topk(images, texts, 10, 10)
    (s, i), (s2, i2) = topk_both_ways(images, texts, 10, 10, 8, 32)
    assert torch.equal(i, full_i) and torch.equal(i2, full_i2)
    torch.testing.assert_close(s, full_s) and torch.testing.assert_close(s2, full_s2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_brute_force_coco_shaped_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    images = tied_features(g, 30)
    texts = tied_features(g, 150)
    text_to_image = coco_like(g, 30)
    images[3] = float("nan")  # a broken image ranks last for every caption, and retrieves nothing
    got = topk_retrieval_metrics(images, texts, text_to_image, KS, image_chunk=7, text_chunk=16)
    assert got == pytest.approx(brute_force_recall(images, texts, text_to_image), abs=1e-6)  # one query is 1/150


def test_recall_equals_brute_force_with_identical_captions_and_random_features():
    g = torch.Generator().manual_seed(5)
    images, texts = torch.randn(25, 8, generator=g), torch.randn(125, 8, generator=g)
    text_to_image = coco_like(g, 25)
    captions = [f"caption {int(c)}" for c in torch.randint(0, 12, (125,), generator=g)]  # many repeats
    got = topk_retrieval_metrics(images, texts, text_to_image, KS, caption_groups(captions), 4, 16)
    assert got == pytest.approx(brute_force_recall(images, texts, text_to_image, captions), abs=1e-6)
    plain = topk_retrieval_metrics(images, texts, text_to_image, KS, None, 4, 16)
    assert plain == pytest.approx(brute_force_recall(images, texts, text_to_image), abs=1e-6)
    assert got != plain  # the groups do change the answer here


def test_collapsed_features_score_zero():
    text_to_image = torch.arange(20).repeat_interleave(5)
    got = topk_retrieval_metrics(torch.ones(20, 4), torch.ones(100, 4), text_to_image, KS, image_chunk=6, text_chunk=9)
    assert set(got.values()) == {0.0}


def test_no_block_larger_than_the_chunks(monkeypatch):
    seen = []
    original = topk_retrieval._block_scores

    def recording(left, right):
        seen.append((left.shape[0], right.shape[0]))
        return original(left, right)

    monkeypatch.setattr(topk_retrieval, "_block_scores", recording)
    g = torch.Generator().manual_seed(0)
    topk_retrieval_metrics(torch.randn(50, 8, generator=g), torch.randn(250, 8, generator=g),
                           torch.arange(50).repeat_interleave(5), KS, image_chunk=16, text_chunk=64)
    assert max(rows for rows, _ in seen) == 16 and max(cols for _, cols in seen) == 64
    assert len(seen) == 4 * 4  # every block once, both directions from it
