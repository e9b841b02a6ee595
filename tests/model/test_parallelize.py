"""parallelize applies the plan from the config: per-block checkpointing, the attention backend;
the TP check and the config's validation of the new keys."""
import pytest

from vlmo_large.config import get_preset
from vlmo_large.model import build_model
from vlmo_large.parallel.parallelize import ExecutionPlan, parallelize, plan_from_config


def test_plan_from_config_and_its_application():
    cfg = get_preset("tiny", attention="explicit", checkpoint_every=3, compile=False)
    assert plan_from_config(cfg) == ExecutionPlan(attention="explicit", checkpoint_every=3, compile=False)
    model = parallelize(build_model(cfg), plan_from_config(cfg))
    blocks = model.backbone.blocks
    assert [b.checkpointed for b in blocks] == [i % 3 == 0 for i in range(cfg.depth)]
    assert {b.attn.backend for b in blocks} == {"explicit"}
    parallelize(model, ExecutionPlan(checkpoint_every=0))  # applying another plan replaces the first
    assert not any(b.checkpointed for b in blocks) and {b.attn.backend for b in blocks} == {"auto"}


def test_a_model_built_for_another_tp_size_is_refused():
    model = build_model("tiny")
    model.backbone.blocks[1].attn.local_heads = 2  # as if built for TP 2 while the run has TP 1
    with pytest.raises(ValueError, match="block 1 holds 2 attention heads"):
        parallelize(model, ExecutionPlan())


@pytest.mark.parametrize("overrides, message", [
    ({"attention": "fast"}, "attention must be"),
    ({"attention": "flex", "attn_drop": 0.1}, "no attention dropout"),
    ({"compile": "yes"}, "compile must be true or false"),
    ({"compile_mode": "fastest"}, "compile_mode must be one of default, reduce-overhead"),
])
def test_config_validation_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **overrides).validate()


def test_compile_mode_reaches_torch_compile_of_every_block(monkeypatch):
    """model.compile_mode=reduce-overhead (CUDA graphs) is what each block's torch.compile gets."""
    cfg = get_preset("tiny", compile=True, compile_mode="reduce-overhead")
    assert plan_from_config(cfg).compile_mode == "reduce-overhead"
    model = build_model(cfg)
    calls = []
    for block in model.backbone.blocks:
        monkeypatch.setattr(block, "compile", lambda **kwargs: calls.append(kwargs))
    parallelize(model, plan_from_config(cfg))
    assert calls == [{"fullgraph": True, "backend": "inductor", "mode": "reduce-overhead"}] * cfg.depth
    assert all(block.attn.compiled for block in model.backbone.blocks)
