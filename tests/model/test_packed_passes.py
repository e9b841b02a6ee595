"""Stage 3's unimodal passes packed into one ([text ; image], block-diagonal attention,
model.pack_unimodal) give the numbers of the two separate passes: the stage-3 losses and every
parameter gradient (fp32, padded text, explicit and SDPA attention), FlexAttention's outputs, the
compiled blocks; and the pair relative bias holds the text and image biases as its diagonal blocks,
which is what lets the packed pass use it.

The reference is the separate image-only and text-only passes (the encoder modes other tests check
against the spec). Equality needs drop path off (tiny has none; eval mode elsewhere): packed, a
sample's text and image share one drop decision.
"""
import pytest
import torch

from tests.conftest import image_batch, randomize_, text_batch
from tests.model.test_flex_attention import differentiable_flex
from vlmo_large.model import build_model, flex_attention
from vlmo_large.model.attention import SelfAttention
from vlmo_large.model.backbone import MoMEBackbone
from vlmo_large.model.relative_position import (RelativePositionBias, image_relative_index, pair_relative_index,
                                                text_relative_index)
from vlmo_large.parallel.parallelize import ExecutionPlan, parallelize
from vlmo_large.training.objectives import TaskObjective
from vlmo_large.training.random_batches import random_batch


def _close(actual, expected, msg=None):
    """fp32 equality to 1e-5, relative to the tensor's scale (sums over rows reorder)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=msg)


def _twin_models(backend: str):
    """(separate, packed): the same random weights, tiny (no drop path, no attention dropout)."""
    torch.manual_seed(0)
    separate = randomize_(build_model("tiny", attention=backend).train())
    packed = build_model("tiny", attention=backend, pack_unimodal=True).train()
    packed.load_state_dict(separate.state_dict())
    return separate, packed


def _record_pass_modes(monkeypatch):
    """The mode of every pass the backbone routes (run_span: every encoder path, one process or pipeline)."""
    modes = []
    real = MoMEBackbone.run_span
    monkeypatch.setattr(MoMEBackbone, "run_span",
                        lambda self, x, mode, *a, **k: modes.append(mode) or real(self, x, mode, *a, **k))
    return modes


# -- the bias -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text_len", [7, 32])
def test_pair_bias_diagonal_blocks_are_the_text_and_image_biases(text_len):
    grid, span = 4, 64
    pair = pair_relative_index(text_len, grid, span)
    assert torch.equal(pair[:text_len, :text_len], text_relative_index(text_len, grid, span))
    assert torch.equal(pair[text_len:, text_len:], image_relative_index(grid))
    for bias in (RelativePositionBias(grid, span, local_heads=3) for _ in range(2)):  # two layers' tables
        torch.nn.init.normal_(bias.table)
        pair_bias, text_bias, image_bias = bias("pair", text_len), bias("text", text_len), bias("image")
        assert torch.equal(pair_bias[:, :text_len, :text_len], text_bias)
        assert torch.equal(pair_bias[:, text_len:, text_len:], image_bias)
        assert not torch.equal(pair_bias[:, :text_len, text_len:], torch.zeros_like(pair_bias[:, :text_len, text_len:]))


# -- one attention call -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["explicit", "sdpa", "flex"])
@pytest.mark.parametrize("queries", [None, 6])
def test_separated_attention_equals_two_attention_calls(backend, queries):
    """[a ; b] with separate_at=len(a) equals attending a and b alone (bias blocks, a's padding)."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, backend=backend).eval()
    randomize_(attn)
    B, Ta, Tb = 2, 5, 7
    x = torch.randn(B, Ta + Tb, 16)
    bias = torch.randn(2, Ta + Tb, Ta + Tb)
    key_mask = torch.ones(B, Ta + Tb, dtype=torch.bool)
    key_mask[1, 3:Ta] = False
    with torch.no_grad():
        packed = attn(x, bias, key_mask, queries, separate_at=Ta)
        first = attn(x[:, :Ta], bias[:, :Ta, :Ta], key_mask[:, :Ta])
        second = attn(x[:, Ta:], bias[:, Ta:, Ta:])
        leaky = attn(x, bias, key_mask, queries)  # without the separation the sequences mix
    expected = torch.cat([first, second], 1)[:, :queries]
    _close(packed, expected)
    assert not torch.allclose(leaky, expected, atol=1e-3)


# -- stage 3: losses and gradients ------------------------------------------------------------------
def _stage3_losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    losses = TaskObjective(model, "vl", seed=1)(batch, step=0)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("backend", ["explicit", "sdpa"])
def test_packed_stage3_losses_and_gradients_equal_separate_passes(backend, monkeypatch):
    separate, packed = _twin_models(backend)
    batch = random_batch("image_text", separate.cfg, 4, torch.Generator().manual_seed(2))
    assert not batch["text_mask"].bool().all()  # padded text
    modes = _record_pass_modes(monkeypatch)
    ref_losses, ref_grads = _stage3_losses_and_grads(separate, batch)
    assert modes == ["image", "text", "pair"]  # the reference ran the separate passes ...
    modes.clear()
    losses, grads = _stage3_losses_and_grads(packed, batch)
    assert modes == ["packed", "pair"]  # ... and the packed model one packed pass instead
    assert losses.keys() == ref_losses.keys()
    for name, ref in ref_losses.items():
        _close(losses[name], ref, msg=name)
    assert grads.keys() == ref_grads.keys()
    for name in ("backbone.blocks.0.rel_pos.table", "backbone.blocks.0.experts.text.fc1.weight",
                 "backbone.blocks.0.experts.imag.fc1.weight", "backbone.blocks.3.experts.vl.fc1.weight",
                 "itc_vl.image_proj.weight"):
        assert name in grads and grads[name].abs().sum() > 0, name
    for name, ref in ref_grads.items():
        _close(grads[name], ref, msg=name)


# -- FlexAttention ------------------------------------------------------------------------------------
def _unimodal_outputs(model, ids, mask, images):
    (image, image_vl), (text, text_vl) = model.backbone.encode_image_and_text(images, ids, mask)
    return [image, image_vl, text, text_vl]


def _batch(cfg):
    ids, mask = text_batch(cfg, 3, lengths=[cfg.max_text_len, 20, 5])
    return ids, mask, image_batch(cfg, 3)


def test_packed_flex_forward_equals_separate_passes():
    """torch's own flex_attention (CPU: inference only)."""
    separate, packed = _twin_models("flex")
    inputs = _batch(separate.cfg)
    with torch.no_grad():
        ref = _unimodal_outputs(separate.eval(), *inputs)
        out = _unimodal_outputs(packed.eval(), *inputs)
    for r, o in zip(ref, out):
        assert o.shape == r.shape == (3, 1, separate.cfg.embed_dim)
        _close(o, r)


def _outputs_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    outs = _unimodal_outputs(model, *inputs)
    gen = torch.Generator().manual_seed(1)
    sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, got):
    (ref_outs, ref_grads), (outs, grads) = ref, got
    for r, o in zip(ref_outs, outs):
        _close(o, r)
    assert grads.keys() == ref_grads.keys() and "backbone.blocks.0.rel_pos.table" in grads
    for name, r in ref_grads.items():
        _close(grads[name], r, msg=name)


def test_packed_flex_gradients_equal_separate_passes(monkeypatch):
    """The flex higher-order op's differentiable CPU path (test_flex_attention.py) in place of the kernel."""
    monkeypatch.setattr(flex_attention, "_kernel", differentiable_flex)
    separate, packed = _twin_models("flex")
    inputs = _batch(separate.cfg)
    _assert_same(_outputs_and_grads(separate, inputs), _outputs_and_grads(packed, inputs))


# -- torch.compile ------------------------------------------------------------------------------------
def test_compiled_packed_pass_equals_eager_separate_passes():
    """parallelize's regional compile (fullgraph: a graph break raises), aot_eager, with checkpointing."""
    torch._dynamo.reset()
    eager, compiled = _twin_models("auto")
    parallelize(compiled, ExecutionPlan(compile=True, checkpoint_every=2, compile_backend="aot_eager"))
    inputs = _batch(eager.cfg)
    _assert_same(_outputs_and_grads(eager, inputs), _outputs_and_grads(compiled, inputs))
