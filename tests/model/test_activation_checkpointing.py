"""Activation checkpointing (every block, every k-th) changes no number: loss and gradients."""
import pytest
import torch

from tests.conftest import image_batch, randomize_, text_batch
from vlmo_large.model import build_model


def _loss_and_grads(every: int):
    torch.manual_seed(0)
    model = randomize_(build_model("tiny", drop_path_rate=0.2).train(), seed=1)
    model.backbone.set_grad_checkpointing(every)
    ids, mask = text_batch(model.cfg, 2, lengths=[32, 11])
    images = image_batch(model.cfg, 2)
    torch.manual_seed(7)  # drop path draws random numbers: recompute must replay them
    bb = model.backbone
    image, image_vl = bb.encode_image(images, vl_branch=True)
    loss = image.pow(2).mean() + image_vl.pow(2).mean() + bb.encode_pair(ids, mask, images).pow(2).mean()
    # the partial last layer (keep=n) under checkpointing too
    cls, cls_vl = bb.encode_image(images, vl_branch=True, keep=1)
    loss = loss + cls.pow(2).mean() + cls_vl.pow(2).mean() + bb.encode_pair(ids, mask, images, keep=32).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_changes_no_number(every):
    ref_loss, ref_grads = _loss_and_grads(0)
    loss, grads = _loss_and_grads(every)
    assert torch.equal(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
