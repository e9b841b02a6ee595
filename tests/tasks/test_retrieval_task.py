"""Retrieval task: the dual-encoder ITC loss against contrastive loss by hand in one process, and
ITM re-ranking: re-ranking none equals the dual encoder, a partial re-rank on hand-made lists, and
held-out retrieval re-ranking every candidate equals ranking by the ITM logit of each pair."""
import pytest
import torch

from tests.conftest import randomize_
from tests.tasks.by_hand import cross_entropy
from vlmo_large.config import get_preset
from vlmo_large.evaluation.itm_rerank import _reranked_hits, itm_reranked_metrics
from vlmo_large.evaluation.pretraining import encode_for_retrieval
from vlmo_large.evaluation.retrieval import retrieval_metrics
from vlmo_large.model import build_model
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.registry import get_task

TASK = get_task("retrieval")
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 3])  # 4 images, 5 captions


def _model():
    return randomize_(build_model(get_preset("tiny"), seed=0), seed=1).eval()


def _items(images=4, texts=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = get_preset("tiny").max_text_len
    mask = (torch.arange(T)[None] < torch.randint(3, T + 1, (texts, 1), generator=gen)).long()
    return (torch.randn(images, 3, 64, 64, generator=gen),
            torch.randint(1, 1024, (texts, T), generator=gen) * mask, mask)


def test_loss_equals_the_contrastive_loss_by_hand():
    model = _model()
    images, ids, mask = _items(images=4, texts=4)
    out = TASK.forward(model, {"image": images, "text_ids": ids, "text_mask": mask}, StepContext())
    with torch.no_grad():
        image_cls = model.backbone.encode_image(images)[:, 0].double()  # every position
        text_cls = model.backbone.encode_text(ids, mask)[:, 0].double()
        img = image_cls @ model.itc.image_proj.weight.double().T
        txt = text_cls @ model.itc.text_proj.weight.double().T
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        logits = model.itc.logit_scale.double().exp() * img @ txt.T
    labels = torch.arange(4)
    expected = (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-6)
    assert out["itc"] is out["loss"]
    assert out["logit_scale"].item() == pytest.approx(model.itc.logit_scale.exp().item())
    assert TASK.passes[0].mode == "image" and TASK.passes[1].mode == "text" and TASK.retrieval


def _itm_by_hand(model, images, ids, mask) -> torch.Tensor:
    """[images, texts] ITM "match" logits: each image with every text."""
    rows = []
    with torch.no_grad():
        for image in images:
            hidden = model.backbone.encode_pair(ids, mask, image.expand(ids.shape[0], -1, -1, -1))
            rows.append(model.itm_head(model.pooler(hidden))[:, 1])
    return torch.stack(rows)


def _recall_by_hand(scores: torch.Tensor, gold: torch.Tensor, k: int) -> float:
    """Rows are queries: a hit when fewer than k non-gold candidates score at least the best gold one."""
    hits = 0
    for row, is_gold in zip(scores, gold):
        best = row[is_gold].max()
        hits += int(((row >= best) & ~is_gold).sum() < k)
    return hits / scores.shape[0]


def test_reranking_nothing_is_the_dual_encoder():
    model = _model()
    images, ids, mask = _items()
    with torch.no_grad():
        image_feats, text_feats = encode_for_retrieval(model, images, ids, mask)
    reranked = itm_reranked_metrics(model, images, ids, mask, image_feats, text_feats, TEXT_TO_IMAGE, rerank_k=0)
    dual = retrieval_metrics(image_feats, text_feats, TEXT_TO_IMAGE)
    assert reranked == {f"{name}_itm": value for name, value in dual.items()}


def test_a_partial_rerank_reorders_only_the_top_k():
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.1]])  # one query's list, best first; its third candidate is gold
    gold = torch.tensor([[False, False, True, False]])
    # the top 2 re-ranked among themselves: the gold candidate stays third
    hits = _reranked_hits(sims, gold, torch.tensor([[1.0, 3.0]]), 2, (1, 2, 3))
    assert [bool(hits[k]) for k in (1, 2, 3)] == [False, False, True]
    # the top 3 re-ranked and the gold one has the best ITM logit: first
    hits = _reranked_hits(sims, gold, torch.tensor([[0.1, -1.0, 5.0]]), 3, (1,))
    assert bool(hits[1])
    # a tie in ITM with a non-gold candidate counts against the gold one
    hits = _reranked_hits(sims, gold, torch.tensor([[5.0, -1.0, 5.0]]), 3, (1, 2))
    assert [bool(hits[k]) for k in (1, 2)] == [False, True]


def test_heldout_retrieval_reports_the_reranked_recall_next_to_the_dual_encoder(dataset):
    """On the synthetic retrieval split (identical caption strings are one gold text), re-ranking
    every caption equals ranking by the ITM logit of each (image, caption) pair."""
    import json

    from vlmo_large.data import load_tokenizer
    from vlmo_large.evaluation.heldout_retrieval import heldout_retrieval

    model, tokenizer = _model(), load_tokenizer(dataset["tokenizer"])
    with open(dataset["retrieval"]["json"]) as f:
        gold_json = json.load(f)
    texts = gold_json["texts"]
    metrics, (images, _, _, text_to_image) = heldout_retrieval(model, dataset["retrieval"], tokenizer, 64, 32,
                                                               rerank_k=len(texts))
    ids, mask = (torch.as_tensor(t) for t in tokenizer.encode_batch(texts, 32))
    scores = _itm_by_hand(model, images, ids, mask)
    same_text = torch.tensor([[a == b for b in texts] for a in texts])
    gold = torch.stack([same_text[text_to_image == i].any(0) for i in range(images.shape[0])])  # [images, texts]
    for k in (1, 5, 10):
        assert metrics[f"tr_r{k}_itm"] == pytest.approx(_recall_by_hand(scores, gold, k))
        assert metrics[f"ir_r{k}_itm"] == pytest.approx(_recall_by_hand(scores.T, gold.T, k))
    assert {"tr_r1", "ir_r1", "chance_r1"} <= metrics.keys()
