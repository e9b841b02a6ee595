"""VQA task: the classifier's shape and vocabulary, the loss against BCE * #answers computed by hand
from the model's own submodules, held-out accuracy and submission entries on a hand-worked case."""
import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import randomize_
from tests.tasks.by_hand import classifier, pooled
from vlmo_large.config import get_preset
from vlmo_large.errors import UserError
from vlmo_large.model import build_model
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.options import TaskOptions
from vlmo_large.tasks.registry import get_task
from vlmo_large.tasks.vqa import vqa_predictions

ANSWERS = ["yes", "no", "2", "red", "cat"]


def _model(labels=True):
    """tiny with a 5-answer classifier; labels: it knows the answer strings (task.answers)."""
    cfg = get_preset("tiny")
    heads = get_task("vqa").heads(cfg, TaskOptions(num_answers=len(ANSWERS)))
    heads["vqa_classifier"].labels = tuple(ANSWERS) if labels else None
    return randomize_(build_model(cfg, heads=heads, seed=0), seed=1).eval()


def _batch(B=4, seed=0):
    cfg = get_preset("tiny")
    gen = torch.Generator().manual_seed(seed)
    T = cfg.max_text_len
    mask = (torch.arange(T)[None] < torch.tensor([T, 9, 20, 5])[:B, None]).long()
    return {"image": torch.randn(B, 3, 64, 64, generator=gen),
            "text_ids": torch.randint(1, cfg.vocab_size, (B, T), generator=gen) * mask, "text_mask": mask,
            "vqa_targets": torch.tensor([[1.0, 0, 0, 0.3, 0], [0, 0.6, 0, 0, 0], [0, 0, 0.9, 0, 0.3],
                                         [0, 0, 0, 0, 0]])[:B],
            "qid": torch.arange(10, 10 + B)}


def test_heads_read_the_vocabulary_and_set_the_width(tmp_path):
    cfg = get_preset("tiny")
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(ANSWERS))
    head = get_task("vqa").heads(cfg, TaskOptions(answers=str(path)))["vqa_classifier"]
    assert head.labels == tuple(ANSWERS)
    assert [tuple(p.shape) for p in head.parameters()] == [(128, 64), (128,), (128,), (128,), (5, 128), (5,)]
    assert [k for k in head.state_dict()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    with pytest.raises(UserError, match="task.num_answers=7 but task.answers"):
        get_task("vqa").heads(cfg, TaskOptions(answers=str(path), num_answers=7))
    with pytest.raises(UserError, match="needs its answer vocabulary"):
        get_task("vqa").heads(cfg, TaskOptions())


def test_logits_shape_and_loss_equal_bce_times_answers_by_hand():
    model, batch = _model(), _batch()
    out = get_task("vqa").forward(model, batch, StepContext())
    with torch.no_grad():
        hidden = model.backbone.encode_pair(batch["text_ids"], batch["text_mask"], batch["image"])  # every position
        logits = classifier(model.vqa_classifier, pooled(model.pooler, hidden))
    assert logits.shape == (4, len(ANSWERS))
    t = batch["vqa_targets"].double()
    bce = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).mean() * len(ANSWERS)
    torch.testing.assert_close(out["loss"].double(), bce, rtol=1e-5, atol=1e-6)
    assert out["vqa"] is out["loss"]
    expected_score = t[torch.arange(4), logits.argmax(-1)].mean()
    torch.testing.assert_close(out["vqa_score"].double(), expected_score)
    out["loss"].backward()
    assert model.vqa_classifier[0].weight.grad.abs().sum() > 0


def _always_answer(model, index):
    """Every question predicts answer `index`: the last Linear reads nothing and its bias picks it."""
    with torch.no_grad():
        last = model.vqa_classifier[3]
        last.weight.zero_()
        last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(index), last.bias.shape[0]).float() * 10)


def test_heldout_accuracy_and_submission_on_a_hand_worked_case():
    model = _model()
    _always_answer(model, ANSWERS.index("2"))
    batch = _batch(3)
    batch["vqa_answers"] = [["2"] * 10,                         # all agree: 1
                            ["two"] * 3 + ["3"] * 7,            # "two" normalises to "2", 3 of 10: 0.9
                            ["yes"] * 10]                       # 0
    first = {k: v[:2] for k, v in batch.items()}
    second = {k: v[2:] for k, v in batch.items()}
    metrics = get_task("vqa").heldout_metrics(model, [first, second])
    # official accuracy: 3 humans said "two": leaving one of them out leaves 2 matches (2/3), leaving
    # one of the 7 others out leaves 3 (1): (3 * 2/3 + 7) / 10 = 0.9
    assert metrics["vqa_acc"] == pytest.approx((1 + 0.9 + 0) / 3)
    assert metrics["vqa_score"] == pytest.approx((0 + 0 + 0.9) / 3)  # the targets' column "2"
    assert metrics["num_questions"] == 3
    assert vqa_predictions(model, [first, second]) == {10: "2", 11: "2", 12: "2"}


def test_without_answer_strings_only_the_soft_score_is_reported():
    model = _model(labels=False)
    _always_answer(model, 0)
    metrics = get_task("vqa").heldout_metrics(model, [_batch(3)])
    assert "vqa_acc" not in metrics and metrics["vqa_score"] == pytest.approx(1.0 / 3)
    with pytest.raises(UserError, match="no answer strings"):
        vqa_predictions(model, [_batch(3)])
