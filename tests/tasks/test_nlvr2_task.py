"""NLVR2 task: two fused passes (the right image on modality-type row 2), the pooled pair -> the
2-way classifier; loss against cross-entropy by hand from the model's own submodules; row 2 starts
as row 1 and is really read; held-out accuracy on a hand-worked case."""
import pytest
import torch

from tests.conftest import randomize_
from tests.tasks.by_hand import classifier, cross_entropy, pooled
from vlmo_large.config import get_preset
from vlmo_large.errors import UserError
from vlmo_large.model import build_model
from vlmo_large.tasks.base import StepContext
from vlmo_large.tasks.options import TaskOptions
from vlmo_large.tasks.registry import get_task

TASK = get_task("nlvr2")


def _cfg():
    return get_preset("tiny", **TASK.model_overrides)


def _model(randomize=True):
    cfg = _cfg()
    model = build_model(cfg, heads=TASK.heads(cfg, TaskOptions()), seed=0)
    return (randomize_(model, seed=1) if randomize else model).eval()


def _batch(B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = _cfg().max_text_len
    mask = (torch.arange(T)[None] < torch.tensor([T, 7, 20, 3])[:B, None]).long()
    return {"image": torch.randn(B, 3, 64, 64, generator=gen), "image2": torch.randn(B, 3, 64, 64, generator=gen),
            "text_ids": torch.randint(1, 1024, (B, T), generator=gen) * mask, "text_mask": mask,
            "nlvr2_labels": torch.tensor([1, 0, 1, 1])[:B]}


def _logits_by_hand(model, batch, right_row=2):
    bb = model.backbone
    with torch.no_grad():
        left = bb.encode_pair(batch["text_ids"], batch["text_mask"], batch["image"], modality_row=1)
        right = bb.encode_pair(batch["text_ids"], batch["text_mask"], batch["image2"], modality_row=right_row)
        return classifier(model.nlvr2_classifier, torch.cat([pooled(model.pooler, left),
                                                             pooled(model.pooler, right)], -1))


def test_the_task_declares_its_third_modality_row():
    assert TASK.model_overrides == {"num_modality_types": 3}
    with pytest.raises(UserError, match="needs model.num_modality_types=3"):
        TASK.heads(get_preset("tiny"), TaskOptions())
    head = TASK.heads(_cfg(), TaskOptions())["nlvr2_classifier"]
    assert [tuple(p.shape) for p in head.parameters()] == [(128, 128), (128,), (128,), (128,), (2, 128), (2,)]


def test_loss_equals_cross_entropy_by_hand():
    model, batch = _model(), _batch()
    out = TASK.forward(model, batch, StepContext())
    logits = _logits_by_hand(model, batch)
    assert logits.shape == (4, 2)
    torch.testing.assert_close(out["loss"].double(), cross_entropy(logits, batch["nlvr2_labels"]),
                               rtol=1e-5, atol=1e-6)
    expected_acc = (logits.argmax(-1) == batch["nlvr2_labels"]).double().mean()
    torch.testing.assert_close(out["nlvr2_acc"].double(), expected_acc)
    out["loss"].backward()
    assert model.backbone.modality_embed.weight.grad[2].abs().sum() > 0  # the right image's row learns


def test_row_two_starts_as_row_one_and_is_read():
    model, batch = _model(randomize=False), _batch()
    rows = model.backbone.modality_embed.weight
    assert torch.equal(rows[2], rows[1]) and not torch.equal(rows[1], rows[0])
    before = _logits_by_hand(model, batch)
    torch.testing.assert_close(before, _logits_by_hand(model, batch, right_row=1))  # equal rows: row 1 alike
    with torch.no_grad():  # not a constant shift: every LayerNorm would remove it
        rows[2] += torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(3))
    after = _logits_by_hand(model, batch)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        logits = TASK.forward(model, batch, StepContext())
    torch.testing.assert_close(logits["loss"].double(), cross_entropy(after, batch["nlvr2_labels"]),
                               rtol=1e-5, atol=1e-6)


def test_heldout_accuracy_on_a_hand_worked_case():
    model = _model()
    with torch.no_grad():  # every statement predicted true
        model.nlvr2_classifier[3].weight.zero_()
        model.nlvr2_classifier[3].bias.copy_(torch.tensor([0.0, 5.0]))
    batch = _batch()  # labels 1, 0, 1, 1
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    assert TASK.heldout_metrics(model, halves) == {"nlvr2_acc": 0.75, "num_statements": 4.0}
