"""Backbone parameter counts equal the reference implementation's (docs/MODEL.md section 3)."""
import pytest

from vlmo_large.model import build_model, count_parameters

REFERENCE = {"base": 175_430_496, "base_plus": 166_567_360, "large": 561_544_448}


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_backbone_count_equals_reference(preset):
    model = build_model(preset, device="meta")
    assert count_parameters(model.backbone) == REFERENCE[preset]
    assert all(p.is_meta for p in model.parameters())


def test_giant_matches_beit3_giant_breakdown():
    model = build_model("giant", device="meta")
    blocks = model.backbone.blocks
    expert = lambda name: sum(count_parameters(b.experts[name]) for b in blocks if name in b.experts)  # noqa: E731
    attention = sum(count_parameters(b.attn) + count_parameters(b.norm1) for b in blocks)
    # BEiT-3 giant: V-FFN 692M, L-FFN 692M, VL-FFN 52M (top 3 layers), shared attention 317M
    assert round(expert("imag") / 1e6) == 692
    assert round(expert("text") / 1e6) == 692
    assert round(expert("vl") / 1e6) == 52
    assert round(attention / 1e6) == 317
    assert 1.8e9 < count_parameters(model.backbone) < 2.0e9


def test_multi_billion_preset_exists():
    model = build_model("xl_6b", device="meta")
    assert 5e9 <= count_parameters(model.backbone) <= 10e9
