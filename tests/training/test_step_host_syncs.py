"""The training step reads no tensor value on the host (a GPU would stall its queue for each read).

A guard replaces every Python-level way of reading a value (item, tolist, bool/int/float/index,
nonzero, masked_select, boolean-mask indexing, numpy) with an error, then a real
forward and backward of each stage runs on (text: padded) random batches. The one allowed reader is the backbone's
`_padding_mask`, whose check runs on CPU tensors only (on a GPU it returns the mask unread).
"""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import randomize_
from vlmo_large.data.masking import IGNORE_INDEX, max_masked_tokens, whole_word_mlm
from vlmo_large.model import build_model
from vlmo_large.tasks.losses import itm_labels, masked_patch_loss, masked_slots, mlm_loss
from vlmo_large.training.objectives import TaskObjective
from vlmo_large.training.random_batches import random_batch

ALLOWED_CALLERS = {"_padding_mask"}
READERS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
           "numpy")


class HostSync(AssertionError):
    pass


def _has_bool_tensor(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


@pytest.fixture
def no_host_reads(monkeypatch):
    """A function that turns the guard on (until the test ends)."""
    return lambda: _refuse_host_reads(monkeypatch)


def _refuse_host_reads(monkeypatch):
    def refusing(name, original):
        def call(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_name not in ALLOWED_CALLERS:
                raise HostSync(f"Tensor.{name} reads a value on the host")
            return original(self, *args, **kwargs)
        return call

    for name in READERS:
        monkeypatch.setattr(torch.Tensor, name, refusing(name, getattr(torch.Tensor, name)))
    for name in ("nonzero", "masked_select"):
        monkeypatch.setattr(torch, name, refusing(name, getattr(torch, name)))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        if _has_bool_tensor(index):
            raise HostSync("boolean-mask indexing sizes its result from the mask's values")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)


def test_the_guard_catches_each_kind_of_host_read(no_host_reads):
    x = torch.arange(6.0)
    no_host_reads()
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.any()), lambda: x[x > 2],
                 lambda: int(x[0]), lambda: x.nonzero(), lambda: torch.nonzero(x), lambda: x.numpy()):
        with pytest.raises(HostSync):
            read()


@pytest.mark.parametrize("stage", ["vl", "text_mlm", "mim"])
def test_forward_and_backward_of_a_step_read_nothing_on_the_host(stage, no_host_reads):
    torch.manual_seed(0)
    model = randomize_(build_model("tiny"))
    batch = random_batch("image" if stage == "mim" else "image_text", model.cfg, 4, torch.Generator().manual_seed(3))
    assert stage == "mim" or (batch["text_mask"] == 0).any(), "a padded batch: the key-mask path runs"
    objective = TaskObjective(model, stage, seed=1, mlm_prob=0.15)  # random_batch's rate
    no_host_reads()
    out = objective(batch, step=2)
    out["loss"].backward()
    head = model.mim_head.predictor if stage == "mim" else model.mlm_head.decoder
    assert head.weight.grad is not None


def test_gathered_mlm_loss_equals_the_mean_over_masked_tokens():
    torch.manual_seed(0)
    model = randomize_(build_model("tiny"))
    hidden = torch.randn(3, 9, 64, requires_grad=True)
    labels = torch.full((3, 9), IGNORE_INDEX)
    labels[0, 1], labels[0, 8], labels[1, 3], labels[2, 0], labels[2, 2], labels[2, 5] = 5, 6, 17, 1000, 3, 9
    masked = labels != IGNORE_INDEX
    expected = F.cross_entropy(model.mlm_head(hidden[masked]), labels[masked])  # the old boolean-index form
    for slots in (3, 5, None):
        torch.testing.assert_close(mlm_loss(model.mlm_head, hidden, labels, slots), expected)
    grad_expected, = torch.autograd.grad(expected, hidden)
    grad, = torch.autograd.grad(mlm_loss(model.mlm_head, hidden, labels, 3), hidden)
    torch.testing.assert_close(grad, grad_expected)


def test_masked_slots_put_the_targets_first_in_order_then_ignored_slots():
    labels = torch.tensor([[-100, 7, -100, 9], [-100, -100, -100, -100]])
    positions, targets = masked_slots(labels, 2)
    assert positions[0].tolist() == [1, 3] and targets.tolist() == [[7, 9], [-100, -100]]


def test_no_masked_token_gives_zero_loss_with_a_gradient():
    model = build_model("tiny")
    hidden = torch.randn(2, 5, 64, requires_grad=True)
    loss = mlm_loss(model.mlm_head, hidden, torch.full((2, 5), IGNORE_INDEX), 2)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None


def test_more_masked_tokens_than_slots_is_an_error_not_a_silent_drop():
    model = build_model("tiny")
    labels = torch.full((1, 6), IGNORE_INDEX)
    labels[0, :3] = 5
    with pytest.raises(RuntimeError, match="more than 2 tokens"):
        mlm_loss(model.mlm_head, torch.randn(1, 6, 64), labels, 2)


@pytest.mark.parametrize("tokens", [False, True])
def test_masked_patch_loss_equals_the_loss_at_the_masked_patches(tokens):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 6, 5, generator=gen)
    targets = torch.randint(0, 5, (2, 6), generator=gen) if tokens else torch.randn(2, 6, 5, generator=gen)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    loss_fn = F.cross_entropy if tokens else F.mse_loss
    torch.testing.assert_close(masked_patch_loss(pred, targets, mask), loss_fn(pred[mask], targets[mask]))


def test_itm_labels_one_positive_then_two_negatives_per_sample():
    assert itm_labels(2, "cpu").tolist() == [1, 1, 0, 0, 0, 0]


def test_whole_word_masking_never_exceeds_the_cap_even_when_every_word_is_long():
    # one 12-piece word in a 16-long sequence: the budget (2) fits no word, the fallback is cut to the cap
    ids = np.array([2] + list(range(10, 22)) + [3, 0, 0])
    starts = np.array([True] + [True] + [False] * 11 + [True, True, True])
    _, labels = whole_word_mlm(ids, starts, rng=np.random.default_rng(0), mask_id=4, special_ids=[0, 1, 2, 3, 4],
                               vocab_size=100, prob=0.15)
    assert (labels != IGNORE_INDEX).sum() == max_masked_tokens(16, 0.15) == 2


@pytest.mark.parametrize("prob", [0.15, 0.4])
def test_random_batches_respect_the_cap(prob):
    model_cfg = build_model("tiny").cfg
    batch = random_batch("image_text", model_cfg, 64, torch.Generator().manual_seed(0), mlm_prob=prob)
    counts = (batch["mlm_labels"] != IGNORE_INDEX).sum(1)
    cap = max_masked_tokens(model_cfg.max_text_len, prob)
    assert counts.max() == cap and counts.min() >= 1  # the cap binds in some rows of 64
    assert ((batch["mlm_labels"] != IGNORE_INDEX) <= batch["text_mask"].bool()).all()
