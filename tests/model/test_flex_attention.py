"""The FlexAttention path (relative bias in a score_mod, key padding in a BlockMask) equals the
explicit reference attention: outputs and gradients (the relative-position table's, q/k/v's) in
fp32, every encoder mode, padded text, the partial last layer.

torch's CPU flex kernel has no backward, so the gradient tests swap the kernel for the
flex_attention higher-order op traced by dynamo's eager backend: the same op the public function
runs, differentiable on a CPU. The public function itself is checked forward-only.
"""
import pytest
import torch
from torch._higher_order_ops.flex_attention import flex_attention as flex_hop

from tests.conftest import image_batch, randomize_, text_batch
from vlmo_large.errors import UserError
from vlmo_large.model import build_model
from vlmo_large.model import flex_attention

_traced_hop = torch.compile(lambda *args: flex_hop(*args), backend="eager", fullgraph=True)


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def differentiable_flex(q, k, v, score_mod=None, block_mask=None, scale=None):
    if block_mask is None:  # no padding: a mask that keeps every key
        block_mask = flex_attention.padding_block_mask(
            torch.ones(q.shape[0], k.shape[2], dtype=torch.bool), q.shape[2])
    out, _, _ = _traced_hop(q, k, v, score_mod or _identity_score, block_mask.as_tuple(), scale,
                            {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False})
    return out


@pytest.fixture
def differentiable_kernel(monkeypatch):
    monkeypatch.setattr(flex_attention, "_kernel", differentiable_flex)


def _set_backend(model, backend):
    for block in model.backbone.blocks:
        block.attn.backend = backend


def _all_modes(model, ids, mask, images):
    bb, T = model.backbone, ids.shape[1]
    image, image_vl = bb.encode_image(images, vl_branch=True)
    text, text_vl = bb.encode_text(ids, mask, vl_branch=True)
    cls, cls_vl = bb.encode_text(ids, mask, vl_branch=True, keep=1)  # queries=1 in the last layers
    return [image, image_vl, text, text_vl, cls, cls_vl, bb.encode_pair(ids, mask, images),
            bb.encode_pair(ids, mask, images, keep=T)]


def _model_and_batch():
    torch.manual_seed(0)
    model = randomize_(build_model("tiny").train())  # tiny: no drop path, no dropout in attention
    cfg = model.cfg
    ids, mask = text_batch(cfg, 3, lengths=[cfg.max_text_len, 20, 5])
    return model, ids, mask, image_batch(cfg, 3)


def _outputs_and_grads(model, ids, mask, images):
    model.zero_grad(set_to_none=True)
    outs = _all_modes(model, ids, mask, images)
    gen = torch.Generator().manual_seed(1)  # random weights: every output element reaches the loss
    sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flex_equals_explicit_outputs_and_gradients(differentiable_kernel):
    model, ids, mask, images = _model_and_batch()
    _set_backend(model, "explicit")
    ref_outs, ref_grads = _outputs_and_grads(model, ids, mask, images)
    _set_backend(model, "flex")
    outs, grads = _outputs_and_grads(model, ids, mask, images)
    for ref, out in zip(ref_outs, outs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert grads.keys() == ref_grads.keys()
    assert "backbone.blocks.0.rel_pos.table" in grads and "backbone.blocks.0.attn.qkv.weight" in grads
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)
    assert grads["backbone.blocks.0.rel_pos.table"].abs().sum() > 0  # the bias gradient does flow


def _explicit_attention(q, k, v, bias, key_mask, scale):
    logits = (q @ k.transpose(-2, -1)) * scale + bias
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("queries", [None, 3])
def test_flex_attend_gradients_of_q_k_v_and_bias(differentiable_kernel, queries):
    """The function alone against the textbook formula: output and the gradients of q, k, v, bias."""
    gen = torch.Generator().manual_seed(0)
    B, H, L, d = 2, 3, 9, 8
    q_len = queries or L
    q = torch.randn(B, H, q_len, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, H, L, d, generator=gen, requires_grad=True) for _ in range(2))
    bias = torch.randn(H, q_len, L, generator=gen, requires_grad=True)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, 5:] = False
    weights = torch.randn(B, H, q_len, d, generator=gen)
    results = []
    for attend in (lambda: flex_attention.flex_attend(q, k, v, bias, flex_attention.padding_block_mask(key_mask, q_len),
                                                      d ** -0.5),
                   lambda: _explicit_attention(q, k, v, bias, key_mask, d ** -0.5)):
        out = attend()
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v, bias))
        results.append((out, *grads))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert results[0][4][:, :, 5:].abs().sum() > 0  # keys padded in sample 1 still get sample 0's gradient


def test_public_flex_attention_forward_on_cpu():
    """torch's own flex_attention (no swap), inference: equals the explicit path."""
    model, ids, mask, images = _model_and_batch()
    model.eval()
    with torch.no_grad():
        _set_backend(model, "explicit")
        ref_outs = _all_modes(model, ids, mask, images)
        _set_backend(model, "flex")
        outs = _all_modes(model, ids, mask, images)
    for ref, out in zip(ref_outs, outs):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_padding_block_mask_is_built_once_per_pass(monkeypatch):
    """Every layer of a pass shares its BlockMask: one per pass, plus one for a partial last layer."""
    model, ids, mask, images = _model_and_batch()
    model.eval()
    _set_backend(model, "flex")
    built = []
    real = flex_attention.padding_block_mask
    monkeypatch.setattr(flex_attention, "padding_block_mask", lambda key_mask, q_len, *rest: built.append(q_len) or
                        real(key_mask, q_len, *rest))
    with torch.no_grad():
        model.backbone.encode_pair(ids, mask, images)
        assert built == [ids.shape[1] + model.cfg.num_patches + 1]
        built.clear()
        model.backbone.encode_pair(ids, mask, images, keep=5)
        assert sorted(built) == [5, ids.shape[1] + model.cfg.num_patches + 1]


def test_training_with_public_flex_on_cpu_is_a_clear_error():
    model, ids, mask, images = _model_and_batch()
    _set_backend(model, "flex")
    with pytest.raises(UserError, match="model.attention 'flex' cannot train on a CPU"):
        model.backbone.encode_text(ids, mask)
