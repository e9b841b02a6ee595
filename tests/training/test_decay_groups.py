"""Weight-decay groups name by name against the reference VLMo's rule, and the reference's text
embedding dropout (issue 11, 8e).

The reference (microsoft/unilm, vlmo/vlmo/modules/vlmo_utils.py, set_schedule) exempts a parameter
from weight decay when its name contains any of the substrings below; its names are this
project's through formats/reference.py.
"""
import pytest
import torch
from torch import nn

from vlmo_large.config import get_preset
from vlmo_large.formats.reference import to_reference
from vlmo_large.model import build_model
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.training.optimization import decays, param_groups

REFERENCE_SET_SCHEDULE_NO_DECAY = ["bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                                   "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]


def reference_decays(reference_name: str) -> bool:
    return not any(nd in reference_name for nd in REFERENCE_SET_SCHEDULE_NO_DECAY)


@pytest.fixture(scope="module")
def base_names():
    """Every parameter name of the base preset (widths shrunk: the names depend on depth, vl_start,
    layer scale and positions only, which stay base's)."""
    cfg = get_preset("base", embed_dim=48, num_heads=4, ffn_dim=96, vocab_size=64)
    names = [n for n, _ in build_model(cfg).named_parameters()]
    assert sum(".attn.q_bias" in n for n in names) == get_preset("base").depth
    return names


def test_every_base_parameter_follows_the_reference_rule(base_names):
    mapped = 0
    for name in base_names:
        reference = to_reference({name: None})
        if reference:  # the MIM head is this project's own: the reference's substrings on its name
            mapped += 1
        expected = reference_decays(next(iter(reference)) if reference else name)
        assert decays(name) == expected, name
        assert decays("model." + name) == expected, name  # as the pretraining objective names it
    assert mapped == len(base_names) - 3  # mim_head.mask_token, predictor.weight / .bias


def test_reference_rule_name_by_name(base_names):
    no_decay = {n for n in base_names if not decays(n)}
    decay = set(base_names) - no_decay
    depth, vl_start = 12, 10
    for i in range(depth):
        assert {f"backbone.blocks.{i}.attn.q_bias", f"backbone.blocks.{i}.attn.v_bias",
                f"backbone.blocks.{i}.norm1.weight", f"backbone.blocks.{i}.norm1.bias",
                f"backbone.blocks.{i}.attn.proj.bias"} <= no_decay
        experts = ("text", "imag") + (("vl",) if i >= vl_start else ())
        assert {f"backbone.blocks.{i}.gamma_1", f"backbone.blocks.{i}.gamma_2", f"backbone.blocks.{i}.attn.qkv.weight",
                *(f"backbone.blocks.{i}.experts.{e}.norm.weight" for e in experts),  # norm2_<expert>.weight
                *(f"backbone.blocks.{i}.experts.{e}.fc1.weight" for e in experts)} <= decay
        assert {f"backbone.blocks.{i}.experts.{e}.norm.bias" for e in experts} <= no_decay  # through "bias"
    assert {"itc.logit_scale", "itc_vl.logit_scale", "backbone.patch_embed.cls_token",
            "backbone.text_embeddings.position_embeddings.weight", "backbone.text_embeddings.word_embeddings.weight",
            "backbone.modality_embed.weight", "mim_head.mask_token", "mlm_head.decoder.weight"} <= decay
    assert {"backbone.blocks.0.rel_pos.table", "backbone.norm.weight", "backbone.text_embeddings.norm.weight",
            "mlm_head.norm.weight", "mlm_head.decoder.bias", "mim_head.predictor.bias", "pooler.dense.bias"} <= no_decay


def test_the_projects_rule_behind_the_switch_exempts_q_bias_too():
    for name in ("backbone.blocks.0.attn.q_bias", "backbone.blocks.0.attn.v_bias", "backbone.blocks.0.gamma_1",
                 "backbone.blocks.0.experts.text.norm.weight", "itc.logit_scale", "backbone.patch_embed.cls_token",
                 "backbone.text_embeddings.position_embeddings.weight", "mim_head.mask_token"):
        assert not decays(name, "vlmo_large"), name
    assert decays("backbone.blocks.0.attn.qkv.weight", "vlmo_large")
    with pytest.raises(ValueError, match="unknown weight-decay rule 'bogus'"):
        decays("x", "bogus")


@pytest.mark.parametrize("rule", ["reference", "vlmo_large"])
def test_param_groups_split_the_trainable_parameters_by_the_rule(rule):
    objective = nn.Module()
    objective.model = build_model("tiny")  # named "model.*", as TaskObjective names them
    apply_stage_freezing(objective.model, "text_mlm")
    groups = {g["name"]: g for g in param_groups(objective, 0.05, rule)}
    names = {id(p): n for n, p in objective.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.05, 0.0)
    assert decay == {n for n in trainable if decays(n, rule)}
    assert "model.backbone.blocks.0.attn.q_bias" not in trainable  # stage 2 freezes attention
    assert "model.backbone.blocks.0.experts.text.fc1.bias" in no_decay
    for name in ("model.backbone.text_embeddings.position_embeddings.weight",
                 "model.backbone.blocks.0.experts.text.norm.weight"):
        assert (name in decay) == (rule == "reference"), name


def test_text_embedding_dropout_follows_drop_path_rate_as_the_reference():
    base = build_model(get_preset("base", embed_dim=48, num_heads=4, ffn_dim=96, vocab_size=64))
    assert get_preset("base").text_dropout_rate == 0.1
    assert base.backbone.text_embeddings.dropout.p == 0.1
    assert get_preset("tiny").text_dropout_rate == get_preset("tiny").drop_path_rate == 0.0
    assert get_preset("base", drop_path_rate=0.2).text_dropout_rate == 0.2
    assert get_preset("base", text_dropout=0.0).text_dropout_rate == 0.0  # an explicit value wins
    torch.manual_seed(0)
    embeddings = base.backbone.text_embeddings.train()
    out = embeddings(torch.randint(0, 64, (4, 16)))
    assert 0.05 < (out == 0).float().mean().item() < 0.15  # about 10% of the values dropped


def test_trainer_and_pipeline_trainer_give_deepspeed_the_rules_groups(tmp_path):
    """Real DeepSpeed engines as the launcher sets them up (one process; the pipeline with one
    stage): the weight decay of every parameter in the optimizer follows optim.decay_rule."""
    import json
    import os
    import subprocess
    import sys

    from tests.training.conftest import REPO
    out = tmp_path / "decay.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "training", "decay_groups_worker.py"),
                             str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    model_names = {n for n, _ in build_model("tiny").named_parameters()}
    for rule, paths in results.items():
        assert {n.removeprefix("model.") for n in paths["engine"]} == model_names
        assert set(paths["pipeline"]) == model_names  # the pipeline's stages hold every VLMo tensor
        for path, decay in paths.items():
            for name, weight_decay in decay.items():
                assert weight_decay == (0.05 if decays(name, rule) else 0.0), (rule, path, name)
        assert paths["pipeline"]["backbone.blocks.0.attn.q_bias"] == 0.0
        assert paths["pipeline"]["backbone.blocks.0.gamma_1"] == (0.05 if rule == "reference" else 0.0)
        assert paths["engine"]["model.backbone.blocks.0.experts.text.norm.weight"] == paths["pipeline"][
            "backbone.blocks.0.experts.text.norm.weight"] == (0.05 if rule == "reference" else 0.0)
