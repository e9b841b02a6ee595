"""retrieval_metrics against hand-computed cases (ties, several captions per image) and against an
independent brute-force ranking on random features."""
import numpy as np
import pytest
import torch

from vlmo_large.evaluation import chance_r_at_1, retrieval_metrics
from vlmo_large.evaluation.retrieval import caption_groups, image_retrieval_ranks, text_retrieval_ranks


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


def test_identical_caption_strings_are_one_gold_text():
    """Three images all captioned "a dog" (features equal, as any encoder gives): without the strings
    the tie puts the other images' copies ahead and R@1 is 0; with them every hit is gold."""
    images = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [-1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.2]])
    strings = ["a dog", "a dog", "a dog", "a cat"]
    gold = torch.tensor([0, 1, 2, 3])
    assert retrieval_metrics(images, texts, gold, ks=(1,))["tr_r1"] == 0.25
    assert retrieval_metrics(images, texts, gold, ks=(1,), texts=strings) == {"tr_r1": 1.0, "ir_r1": 1.0}


def brute_force_by_string(image_feats, text_feats, text_to_image, strings, ks):
    """Independent: gold texts of an image are all captions whose string is one of its captions';
    gold images of a caption are all images with a caption of that string; rank = non-gold items
    scoring at least the best gold one."""
    a, b = image_feats.double().numpy(), text_feats.double().numpy()
    sims = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    owner = text_to_image.tolist()
    tr, ir = [], []
    for i in range(len(a)):
        mine = {strings[j] for j in range(len(b)) if owner[j] == i}
        gold = [strings[j] in mine for j in range(len(b))]
        best = max(sims[i, j] for j in range(len(b)) if gold[j])
        tr.append(sum(1 for j in range(len(b)) if not gold[j] and sims[i, j] >= best))
    for j in range(len(b)):
        gold = {owner[k] for k in range(len(b)) if strings[k] == strings[j]}
        best = max(sims[i, j] for i in gold)
        ir.append(sum(1 for i in range(len(a)) if i not in gold and sims[i, j] >= best))
    return {f"{n}_r{k}": float(np.mean(np.array(r) < k)) for n, r in (("tr", tr), ("ir", ir)) for k in ks}


def test_string_gold_matches_brute_force_on_random_features():
    gen = torch.Generator().manual_seed(5)
    num_images, vocabulary = 13, ["a dog", "a cat", "a red car", "two birds", "a boat"]
    text_to_image = torch.cat([torch.arange(num_images), torch.randint(0, num_images, (20,), generator=gen)])
    strings = [vocabulary[int(i)] if int(i) < len(vocabulary) else f"unique {j}"
               for j, i in enumerate(torch.randint(0, 9, (len(text_to_image),), generator=gen))]
    images = torch.randn(num_images, 6, generator=gen)
    first = {}
    texts = torch.randn(len(strings), 6, generator=gen)
    texts = torch.stack([texts[first.setdefault(s, j)] for j, s in enumerate(strings)])  # same string, same features
    ks = (1, 3, 5)
    got = retrieval_metrics(images, texts, text_to_image, ks, texts=strings)
    assert got == pytest.approx(brute_force_by_string(images, texts, text_to_image, strings, ks))
    groups = caption_groups(strings)
    for ranks in (image_retrieval_ranks, text_retrieval_ranks):
        assert torch.equal(ranks(images, texts, text_to_image, chunk=4, groups=groups),
                           ranks(images, texts, text_to_image, groups=groups))
