"""timm's BEiT weights, converted, give the same image-only token features as timm's own forward."""
import pytest
import timm
import torch

from vlmo_large.formats.beit import load_beit_checkpoint
from vlmo_large.formats.io import CheckpointError
from vlmo_large.model import build_model


def _randomized_beit(**kwargs):
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # relative tables and q/v biases start at zero in timm: make them matter
        for p in beit.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return beit


def _vision_only(model):
    with torch.no_grad():
        model.backbone.modality_embed.weight.zero_()  # BEiT has no modality-type rows
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))


def test_token_features_equal_timm(images):
    beit = _randomized_beit(global_pool="token")  # keeps BEiT's final norm on the tokens
    model = _vision_only(build_model("base", drop_path_rate=0.0).eval())
    report = load_beit_checkpoint(model, beit.state_dict())
    assert any("experts.text" in n for n in report.missing)  # the language path stays new
    assert not [n for n in report.missing if "experts.imag" in n or ".attn." in n]
    with torch.no_grad():
        expected = beit.forward_features(images)
        ours = model.backbone.encode_image(images)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_mean_pooling_variant_matches_before_final_norm(images):
    """timm's default BEiT keeps its last norm for pooled features: compare the block outputs."""
    beit = _randomized_beit()
    model = _vision_only(build_model("base", drop_path_rate=0.0).eval())
    report = load_beit_checkpoint(model, beit.state_dict())
    assert "fc_norm.weight" in report.unexpected and "backbone.norm.weight" in report.missing
    bb = model.backbone
    with torch.no_grad():
        expected = beit.forward_features(images)
        x = bb.embed_image(images)
        ours = bb.run_blocks(x, ["imag"] * bb.cfg.depth, bb._bias("image", 0))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_shape_mismatch_names_the_tensor():
    beit = timm.create_model("beit_large_patch16_224", pretrained=False, num_classes=0)
    model = build_model("base")
    with pytest.raises(CheckpointError, match=r"tensor '(blocks.0.attn.relative_position_bias_table|backbone.patch_embed.proj.weight)'"):
        load_beit_checkpoint(model, beit.state_dict())
