"""The fused SDPA path equals the explicit reference attention in every encoder mode."""
import pytest
import torch

from tests.conftest import image_batch, text_batch


def _set_backend(model, backend):
    for block in model.backbone.blocks:
        block.attn.backend = backend


def _all_modes(model, ids, mask, images):
    bb = model.backbone
    image, image_vl = bb.encode_image(images, vl_branch=True)
    text, text_vl = bb.encode_text(ids, mask, vl_branch=True)
    return [image, image_vl, text, text_vl, bb.encode_pair(ids, mask, images)]


@pytest.mark.parametrize("preset_overrides", [{}, {"use_rel_pos_bias": False, "use_abs_pos_emb": True,
                                                   "layer_scale_init": None}])
def test_sdpa_equals_explicit_with_padding(preset_overrides):
    from tests.conftest import randomize_
    from vlmo_large.model import build_model
    torch.manual_seed(0)
    model = randomize_(build_model("tiny", **preset_overrides).eval())
    cfg = model.cfg
    ids, mask = text_batch(cfg, 3, lengths=[cfg.max_text_len, 20, 5])
    images = image_batch(cfg, 3)
    _set_backend(model, "explicit")
    reference = _all_modes(model, ids, mask, images)
    _set_backend(model, "sdpa")
    fused = _all_modes(model, ids, mask, images)
    for ref, out in zip(reference, fused):  # 1e-6 relative to the features' scale
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_padding_is_masked_out(tiny_model):
    """Changing padded token ids must not change any real token's output (keys are masked)."""
    cfg = tiny_model.cfg
    ids, mask = text_batch(cfg, 2, lengths=[10, 20])
    images = image_batch(cfg, 2)
    other = ids.clone()
    other[mask == 0] = 7
    bb = tiny_model.backbone
    for fn in (lambda i: bb.encode_text(i, mask), lambda i: bb.encode_pair(i, mask, images)):
        a, b = fn(ids), fn(other)
        keep = torch.cat([mask, torch.ones(2, a.shape[1] - mask.shape[1], dtype=torch.long)], 1).bool()
        torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-6)
        assert not torch.allclose(a[~keep], b[~keep])  # the padded positions themselves do change


def test_relative_bias_changes_attention(tiny_model):
    """Guard against a bias that silently is not applied."""
    cfg = tiny_model.cfg
    images = image_batch(cfg, 2)
    before = tiny_model.backbone.encode_image(images)
    with torch.no_grad():
        table = tiny_model.backbone.blocks[0].rel_pos.table
        table.add_(1.0 * torch.randn_like(table))
    assert not torch.allclose(before, tiny_model.backbone.encode_image(images), atol=1e-4)


def test_auto_takes_sdpa_unless_a_cpu_bias_needs_gradients(tiny_model):
    """auto: torch has no fused CPU kernel for a bias that needs a gradient (SDPA would fall back to
    its math path), so training on a CPU runs the explicit math; inference keeps SDPA."""
    attn = tiny_model.backbone.blocks[0].attn
    assert attn.backend == "auto"
    q = torch.zeros(1, attn.local_heads, 3, attn.head_dim)
    learned = torch.zeros(attn.local_heads, 3, 3, requires_grad=True)
    assert attn.choose_backend(q, learned) == "explicit"
    assert attn.choose_backend(q, learned.detach()) == attn.choose_backend(q, None) == "sdpa"
    with torch.no_grad():
        assert attn.choose_backend(q, learned) == "sdpa"


def test_unpadded_batch_skips_the_mask_with_the_same_result(tiny_model):
    """A batch without padding runs without a key mask; its rows equal the same rows computed in a
    batch that has padding (and so a mask)."""
    cfg = tiny_model.cfg
    ids, mask = text_batch(cfg, 2, lengths=[cfg.max_text_len, 7])
    images = image_batch(cfg, 2)
    bb = tiny_model.eval().backbone
    alone = [bb.encode_text(ids[:1], mask[:1]), bb.encode_pair(ids[:1], mask[:1], images[:1])]
    batched = [bb.encode_text(ids, mask)[:1], bb.encode_pair(ids, mask, images)[:1]]
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
