"""Each layout rule (TP divides heads/FFN/vocabulary, the world splits into TP x PP replicas, a pipeline
runs ZeRO 0/1 only, every stage holds a block) is one function, and every entry point that checks it
says the same line: the run validation, the model config, the layout, the memory estimator and the
checkpoint splitter. The expected lines are written out here, not taken from the functions."""
import pytest
import torch
from safetensors.torch import save_file

from vlmo_large.checkpoint.sharded import write_sharded
from vlmo_large.config import get_preset
from vlmo_large.memory import Layout, estimate
from vlmo_large.parallel.layout import data_parallel_size, validate_layout
from vlmo_large.training.run_config import ConfigError, load_run_config
from vlmo_large.training.validation import resolve_run

TP_LINE = ("tensor parallel size 3 does not divide num_heads=4 of 'tiny': "
           "pick a tp that divides heads, FFN and vocabulary")
WORLD_LINE = "world size 6 is not divisible by parallel.tp (2) * parallel.pp (2)"
PP_ZERO_LINE = "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only: set zero_optimization.stage to 1"
DEPTH_LINE = "pipeline parallel size 8 exceeds the depth 4 of 'tiny': every stage needs at least one block"


def run_error(overrides, zero, world):
    cfg = load_run_config(None, ["data.source=random", "batch.micro=2", *overrides])
    with pytest.raises(ConfigError) as err:
        resolve_run(cfg, {"zero_optimization": {"stage": zero}}, world)
    return str(err.value)


def error_of(fn, *args):
    with pytest.raises(ValueError) as err:
        fn(*args)
    return str(err.value)


@pytest.fixture
def plain_file(tmp_path):
    path = tmp_path / "model.safetensors"  # the splitter checks the layout before reading tensors
    save_file({"x": torch.zeros(1)}, str(path))
    return str(path)


def test_tensor_parallel_rule(plain_file, tmp_path):
    tiny = get_preset("tiny")
    assert run_error(["parallel.tp=3"], 1, 3) == TP_LINE
    assert error_of(tiny.validate, 3) == TP_LINE
    assert error_of(validate_layout, tiny, 3, 1, 1, 1, 3) == TP_LINE
    assert error_of(estimate, tiny, Layout(tp=3)) == TP_LINE
    assert error_of(write_sharded, plain_file, str(tmp_path / "out"), 3, 1, tiny) == TP_LINE
    tiny.validate(2)  # 4 heads, 256 FFN, 1024 words: 2 divides all three


def test_world_size_rule():
    assert run_error(["parallel.tp=2", "parallel.pp=2"], 1, 6) == WORLD_LINE
    assert error_of(data_parallel_size, 6, 2, 2) == WORLD_LINE
    assert error_of(validate_layout, get_preset("tiny"), 2, 2, 1, 1, 6) == WORLD_LINE
    assert data_parallel_size(8, 2, 2) == 2


def test_pipeline_zero_rule():
    tiny = get_preset("tiny")
    assert run_error(["parallel.pp=2"], 2, 2) == PP_ZERO_LINE
    assert error_of(validate_layout, tiny, 1, 2, 1, 3, 2) == PP_ZERO_LINE
    assert error_of(estimate, tiny, Layout(pp=2, zero=2)) == PP_ZERO_LINE
    validate_layout(tiny, 1, 2, 1, 1, 2)


def test_pipeline_depth_rule(plain_file, tmp_path):
    tiny = get_preset("tiny")
    assert run_error(["parallel.pp=8"], 1, 8) == DEPTH_LINE
    assert error_of(validate_layout, tiny, 1, 8, 1, 1, 8) == DEPTH_LINE
    assert error_of(estimate, tiny, Layout(pp=8, zero=1)) == DEPTH_LINE
    assert error_of(write_sharded, plain_file, str(tmp_path / "out"), 1, 8, tiny) == DEPTH_LINE
