"""tools/estimate_memory.py: counts from the model itself, model states equal DeepSpeed's estimator."""
import json
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from vlmo_large.config import get_preset
from tools.estimate_memory import main as estimate_memory_main
from vlmo_large.memory import Layout, estimate, params_per_stage


@pytest.mark.parametrize("dp", [1, 8, 64])
def test_zero3_model_states_equal_deepspeed_estimator(dp):
    result = estimate(get_preset("large"), Layout(dp=dp, zero=3))
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        result["total_params"], result["largest_module_params"], num_gpus_per_node=dp, cpu_offload=False)
    assert result["model_states_gib"] * 1024 ** 3 == pytest.approx(gpu_bytes, rel=1e-9, abs=8)


@pytest.mark.parametrize("dp", [1, 16])
def test_zero2_model_states_equal_deepspeed_estimator(dp):
    result = estimate(get_preset("base"), Layout(dp=dp, zero=2))
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(result["total_params"], num_gpus_per_node=dp,
                                                         cpu_offload=False)
    assert result["model_states_gib"] * 1024 ** 3 == pytest.approx(gpu_bytes, rel=1e-9, abs=8)


def test_tensor_and_pipeline_split_covers_every_parameter_once():
    cfg = get_preset("tiny")
    total = sum(params_per_stage(cfg, 1, 1))
    assert sum(params_per_stage(cfg, 1, 2)) == total
    # TP=2 halves exactly the TP-sharded parameters
    result = estimate(cfg, Layout(tp=2))
    assert sum(params_per_stage(cfg, 2, 1)) == total - result["tensor_parallel_params"] // 2


def test_cli_json_and_errors(capsys):
    # one real process: the script runs from a shell; the error cases run its main() in this one
    out = subprocess.run([sys.executable, "tools/estimate_memory.py", "--preset", "base", "--dp", "8", "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["backbone_params"] == 175_430_496 and result["total_params"] > result["backbone_params"]
    capsys.readouterr()
    assert estimate_memory_main(["--preset", "giant", "--pp", "2", "--zero", "3"]) == 2
    assert "ZeRO stage 0 or 1" in capsys.readouterr().err
    assert estimate_memory_main(["--preset", "base", "--tp", "5"]) == 2
    assert "tensor parallel size 5 does not divide num_heads=12" in capsys.readouterr().err
