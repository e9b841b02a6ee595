"""retrieval_metrics against hand-computed cases (ties, several captions per image) and against an
independent brute-force ranking on random features."""
import numpy as np
import pytest
import torch

from vlmo_large.evaluation import chance_r_at_1, retrieval_metrics
from vlmo_large.evaluation.retrieval import image_retrieval_ranks, text_retrieval_ranks


def hand_case():
    """Images at 0, 90 and 180 degrees; five captions, two each for images 0 and 2.

    Cosines (rows images, columns captions t0..t4), worked out by hand:
        I0:  .970  .316 -.316 -.970  .707     gold {t0, t1}: t0 first          -> rank 0
        I1:  .243  .949  .949 -.243 -.707     gold {t2}: ties with t1 (mirror)  -> rank 1 (tie counts against)
        I2: -.970 -.316  .316  .970 -.707     gold {t3, t4}: t3 first          -> rank 0
    Caption queries: t0 -> I0 rank 0; t1 -> I0 rank 1 (I1 higher); t2 -> I1 rank 0; t3 -> I2 rank 0;
    t4 -> I2 rank 2 (I0 higher, I1 exactly tied).
    """
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[4.0, 1.0], [1.0, 3.0], [-1.0, 3.0], [-4.0, -1.0], [1.0, -1.0]])
    return images, texts, torch.tensor([0, 0, 1, 2, 2])


def test_hand_computed_ranks_with_ties_and_multi_caption_images():
    images, texts, gold = hand_case()
    assert text_retrieval_ranks(images, texts, gold).tolist() == [0, 1, 0]
    assert image_retrieval_ranks(images, texts, gold).tolist() == [0, 1, 0, 0, 2]
    got = retrieval_metrics(images, texts, gold, ks=(1, 2, 3))
    want = {"tr_r1": 2 / 3, "tr_r2": 1.0, "tr_r3": 1.0, "ir_r1": 3 / 5, "ir_r2": 4 / 5, "ir_r3": 1.0}
    assert got == pytest.approx(want)


def test_default_keys_and_unnormalised_features_give_the_same_answer():
    images, texts, gold = hand_case()
    got = retrieval_metrics(images * 7.0, texts * torch.tensor([[0.5], [3.0], [1.0], [2.0], [9.0]]), gold)
    assert got == pytest.approx({"tr_r1": 2 / 3, "tr_r5": 1.0, "tr_r10": 1.0,
                                 "ir_r1": 3 / 5, "ir_r5": 1.0, "ir_r10": 1.0})


def test_collapsed_or_nan_features_score_zero_not_perfect():
    # Every candidate ties with the gold one: all of them rank ahead of it.
    same = torch.ones(6, 4)
    gold = torch.arange(6)
    got = retrieval_metrics(same, same, gold, ks=(1, 5, 6))
    assert got["tr_r1"] == got["ir_r1"] == got["tr_r5"] == got["ir_r5"] == 0.0
    assert got["tr_r6"] == got["ir_r6"] == 1.0  # rank 5 (0-based) of 6
    nan = torch.full((6, 4), float("nan"))
    assert retrieval_metrics(nan, nan, gold, ks=(1, 5))["tr_r1"] == 0.0


def brute_force(image_feats, text_feats, text_to_image, ks):
    """Independent: numpy cosine, full sort per query, position of the first gold item."""
    a = image_feats.double().numpy()
    b = text_feats.double().numpy()
    sims = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    gold = text_to_image.numpy()
    tr = [min(np.where(np.argsort(-sims[i]) == j)[0][0] for j in np.where(gold == i)[0]) for i in range(len(a))]
    ir = [int(np.where(np.argsort(-sims[:, j]) == gold[j])[0][0]) for j in range(len(b))]
    out = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in ks:
            out[f"{name}_r{k}"] = float(np.mean(np.array(ranks) < k))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_features(seed):
    gen = torch.Generator().manual_seed(seed)
    num_images, dim = 40, 8  # low dimension: plenty of near misses
    captions_per_image = torch.randint(1, 4, (num_images,), generator=gen)
    gold = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    gold = gold[torch.randperm(len(gold), generator=gen)]
    images = torch.randn(num_images, dim, generator=gen)
    texts = images[gold] + 1.2 * torch.randn(len(gold), dim, generator=gen)  # informative but noisy
    ks = (1, 5, 10)
    got = retrieval_metrics(images, texts, gold, ks)
    assert got == pytest.approx(brute_force(images, texts, gold, ks), abs=1e-6)
    assert 0.0 < got["ir_r1"] < got["ir_r5"] < got["ir_r10"] < 1.0  # not a degenerate case
    # Chunked evaluation (large splits) gives the same ranks.
    assert torch.equal(text_retrieval_ranks(images, texts, gold, chunk=7), text_retrieval_ranks(images, texts, gold))
    assert torch.equal(image_retrieval_ranks(images, texts, gold, chunk=7), image_retrieval_ranks(images, texts, gold))


def test_chance_level_matches_random_features():
    gen = torch.Generator().manual_seed(0)
    num_images, trials = 10, 400
    gold = torch.arange(num_images).repeat_interleave(2)  # two captions each
    hits = [retrieval_metrics(torch.randn(num_images, 16, generator=gen), torch.randn(20, 16, generator=gen),
                              gold, ks=(1,)) for _ in range(trials)]
    assert chance_r_at_1(num_images) == pytest.approx(0.1)
    for key in ("tr_r1", "ir_r1"):
        assert np.mean([h[key] for h in hits]) == pytest.approx(chance_r_at_1(num_images), abs=0.02)


def test_rejects_inconsistent_inputs():
    images, texts, _ = hand_case()
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 2]))
