"""Layout validation: supported layouts pass, every unsupported one names what to change; and
megatron's rank order gives the same TP/DP/PP groups as DeepSpeed's pipeline topology."""
import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core.parallel_state import RankGenerator

from vlmo_large.config import get_preset
from vlmo_large.parallel.layout import validate_layout


@pytest.mark.parametrize("preset, tp, pp, dp, zero", [
    ("base", 1, 1, 8, 3), ("large", 2, 1, 8, 3), ("large", 2, 1, 4, 2), ("large", 2, 1, 2, 1),
    ("giant", 4, 2, 8, 1), ("giant", 8, 4, 2, 0), ("tiny", 2, 2, 1, 1)])
def test_supported_layouts_pass(preset, tp, pp, dp, zero):
    validate_layout(get_preset(preset), tp, pp, dp, zero, tp * pp * dp)


@pytest.mark.parametrize("zero", [2, 3])
def test_pipeline_with_zero_2_or_3_is_refused(zero):
    with pytest.raises(ValueError) as err:
        validate_layout(get_preset("giant"), 4, 2, 8, zero, 64)
    assert str(err.value) == ("DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only: "
                              "set zero_optimization.stage to 1")


@pytest.mark.parametrize("key, overrides", [
    ("num_heads", {"num_heads": 6, "embed_dim": 384}), ("ffn_dim", {"ffn_dim": 3074}),
    ("vocab_size", {"vocab_size": 30522})])
def test_tp_must_divide_heads_ffn_and_vocabulary(key, overrides):
    cfg = get_preset("base", **dict({"vocab_size": 30720}, **overrides))  # base's 30522 = 2 x 15261
    with pytest.raises(ValueError, match=f"tensor parallel size 4 does not divide {key}="):
        validate_layout(cfg, 4, 1, 2, 1, 8)


def test_pp_larger_than_depth_is_refused():
    with pytest.raises(ValueError, match="pipeline parallel size 8 exceeds the depth 4"):
        validate_layout(get_preset("tiny"), 1, 8, 1, 1, 8)


def test_world_size_must_be_the_product():
    with pytest.raises(ValueError, match=r"world size 16 != tp\*pp\*dp = 2\*2\*2 = 8"):
        validate_layout(get_preset("large"), 2, 2, 2, 1, 16)


def test_messages_are_one_line():
    for args in [(4, 2, 8, 3, 64), (3, 1, 1, 1, 3), (1, 99, 1, 1, 99), (1, 1, 2, 1, 3)]:
        with pytest.raises(ValueError) as err:
            validate_layout(get_preset("giant"), *args)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("tp, pp, dp", [(2, 2, 1), (2, 2, 2), (4, 2, 8), (1, 4, 2), (8, 1, 2)])
def test_megatron_order_matches_deepspeed_topology(tp, pp, dp):
    megatron = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for token, axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe")):
        assert sorted(map(sorted, megatron.get_ranks(token))) == sorted(map(sorted, topo.get_axis_comm_lists(axis)))
