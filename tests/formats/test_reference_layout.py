"""Reference VLMo layout: export -> import is exact; wrappers, buffers and unknown keys are handled."""
import pytest
import torch

from tests.conftest import randomize_
from vlmo_large.formats.io import CheckpointError, load_torch_file
from vlmo_large.formats.reference import load_reference_checkpoint, save_reference_checkpoint, to_reference
from vlmo_large.model import build_model


def _model(preset="tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(build_model(preset, **overrides), seed=seed)


def test_reference_names_follow_model_md_section7():
    ref = to_reference(build_model("base", device="meta").state_dict())
    assert tuple(ref["relative_position_bias_table"].shape) == (1126, 144)
    for key in ["logit_scale", "logit_vl_scale", "transformer.cls_token", "transformer.blocks.0.attn.q_bias",
                "transformer.blocks.11.norm2_vl.weight", "transformer.blocks.0.mlp_imag.fc2.bias",
                "text_embeddings.LayerNorm.weight", "token_type_embeddings.weight", "mlm_score.bias",
                "mlm_score.decoder.weight", "itm_score.fc.weight", "itc_vl_text_proj.fc.weight"]:
        assert key in ref, key
    assert tuple(ref["transformer.blocks.0.attn.qkv.weight"].shape) == (2304, 768)
    assert ref["logit_scale"].shape == ref["logit_vl_scale"].shape == ()  # the reference's 0-dim scalars
    assert "transformer.blocks.9.mlp_vl.fc1.weight" not in ref  # VL experts only in the top 2 of base


@pytest.mark.parametrize("wrapper", ["state_dict", "module", "model", None])
def test_export_import_round_trip_is_exact(tmp_path, wrapper):
    source = _model(seed=1)
    ref = to_reference(source.state_dict())
    ref["text_embeddings.position_ids"] = torch.arange(32)[None]  # a buffer the reference saves
    if wrapper == "module":
        ref = {f"module.{k}": v for k, v in ref.items()}
    payload = ref if wrapper is None else {wrapper: ref, "epoch": 3}
    path = tmp_path / "ref.ckpt"
    torch.save(payload, path)

    target = _model(seed=2)
    report = load_reference_checkpoint(target, str(path))
    assert report.unexpected == []
    assert all(n.startswith("mim_head.") for n in report.missing)  # project-only head
    src, dst = source.state_dict(), target.state_dict()
    for name in src:
        if not name.startswith("mim_head."):
            assert torch.equal(src[name], dst[name]), name
    ids = torch.randint(1, 1024, (2, 32))
    mask = torch.ones_like(ids)
    images = torch.randn(2, 3, 64, 64)
    source.eval(), target.eval()
    assert torch.equal(source.backbone.encode_pair(ids, mask, images), target.backbone.encode_pair(ids, mask, images))


def test_unknown_keys_are_reported_by_name(tmp_path):
    ref = to_reference(_model().state_dict())
    ref["vqa_classifier.0.weight"] = torch.zeros(3, 3)
    del ref["transformer.blocks.0.gamma_1"]
    torch.save({"state_dict": ref}, tmp_path / "r.pt")
    report = load_reference_checkpoint(_model(), str(tmp_path / "r.pt"))
    assert report.unexpected == ["vqa_classifier.0.weight"]
    assert "backbone.blocks.0.gamma_1" in report.missing
    assert "vqa_classifier.0.weight" in report.summary()


def test_relative_table_resampled_for_another_image_size(tmp_path):
    source = _model()
    torch.save(to_reference(source.state_dict()), tmp_path / "r.pt")
    target = _model(image_size=96)  # grid 6 instead of 4
    report = load_reference_checkpoint(target, str(tmp_path / "r.pt"))
    assert any("grid 4 -> 6" in c for c in report.converted)
    assert target.backbone.blocks[0].rel_pos.table.shape[0] == 11 ** 2 + 3 + 2 * 64 + 2


def test_code_in_a_checkpoint_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "flag"),))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_torch_file(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "flag").exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_torch_file(str(tmp_path / "cut.pt"))


def test_save_reference_checkpoint_loads_back_exactly(tmp_path):
    source, target = _model(seed=3), _model(seed=4)
    save_reference_checkpoint(source, str(tmp_path / "vlmo.ckpt"))
    raw = torch.load(tmp_path / "vlmo.ckpt", weights_only=True)
    assert "transformer.blocks.0.attn.qkv.weight" in raw["state_dict"]
    load_reference_checkpoint(target, str(tmp_path / "vlmo.ckpt"))
    for name, tensor in source.state_dict().items():
        if not name.startswith("mim_head."):
            assert torch.equal(tensor, target.state_dict()[name]), name


def reference_state_dict_keys(depth: int, vl_start: int, abs_pos: bool = False) -> set[str]:
    """The keys of the reference VLMo's state_dict(), written out from its modules (unilm vlmo:
    vlmo_module.VLMo, multiway_transformer, heads; transformers 4.8.1 BertEmbeddings, whose
    `position_ids` buffer is persistent; the relative-position indices are plain attributes)."""
    keys = {"text_embeddings.word_embeddings.weight", "text_embeddings.position_embeddings.weight",
            "text_embeddings.token_type_embeddings.weight", "text_embeddings.LayerNorm.weight",
            "text_embeddings.LayerNorm.bias", "text_embeddings.position_ids", "token_type_embeddings.weight",
            "transformer.cls_token", "transformer.patch_embed.proj.weight", "transformer.patch_embed.proj.bias",
            "transformer.norm.weight", "transformer.norm.bias", "relative_position_bias_table",
            "pooler.dense.weight", "pooler.dense.bias", "mlm_score.bias", "mlm_score.decoder.weight",
            "mlm_score.transform.dense.weight", "mlm_score.transform.dense.bias",
            "mlm_score.transform.LayerNorm.weight", "mlm_score.transform.LayerNorm.bias",
            "itm_score.fc.weight", "itm_score.fc.bias", "itc_text_proj.fc.weight", "itc_image_proj.fc.weight",
            "itc_vl_text_proj.fc.weight", "itc_vl_image_proj.fc.weight", "logit_scale", "logit_vl_scale"}
    keys |= {"transformer.pos_embed"} if abs_pos else set()
    for i in range(depth):
        block = f"transformer.blocks.{i}."
        keys |= {block + k for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
                                     "attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2")}
        for expert in ("text", "imag") + (("vl",) if i >= vl_start else ()):
            keys |= {f"{block}norm2_{expert}.{p}" for p in ("weight", "bias")}
            keys |= {f"{block}mlp_{expert}.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
    return keys


def test_reference_export_has_exactly_the_reference_keys(tmp_path):
    """The reference loads with load_state_dict(strict=True): every key, position_ids included."""
    model = _model()
    save_reference_checkpoint(model, str(tmp_path / "vlmo.pt"))
    state = torch.load(tmp_path / "vlmo.pt", weights_only=True)["state_dict"]
    assert set(state) == reference_state_dict_keys(model.cfg.depth, model.cfg.vl_start)
    ids = state["text_embeddings.position_ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == [list(range(model.cfg.max_text_len))]
    assert state["text_embeddings.position_embeddings.weight"].shape[0] == ids.shape[1]
