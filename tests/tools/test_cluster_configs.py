"""The cluster DeepSpeed configs: a valid layout, consistent batch sizes, and a fit on 80 GB cards
by tools/estimate_memory.py (the numbers in launchers/CLUSTER.md)."""
import json
import os
import sys

import pytest

from vlmo_large.config import get_preset
from vlmo_large.parallel.layout import validate_layout

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(REPO, "tools"))
import estimate_memory  # noqa: E402

# file -> (preset, tp, pp, dp): the layout each config is written for
CLUSTER_CONFIGS = {
    "base_8gpu_zero2_bf16.json": ("base", 1, 1, 8),
    "large_16gpu_zero2_bf16.json": ("large", 1, 1, 16),
    "giant_64gpu_tp4_pp2_zero1_bf16.json": ("giant", 4, 2, 8),
}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_cluster_config_fits_80gb_cards(name, capsys):
    preset, tp, pp, dp = CLUSTER_CONFIGS[name]
    with open(os.path.join(REPO, "ds_configs", name)) as f:
        ds = json.load(f)
    zero, micro = ds["zero_optimization"]["stage"], ds["train_micro_batch_size_per_gpu"]
    validate_layout(get_preset(preset), tp, pp, dp, zero, tp * pp * dp)
    assert ds["train_batch_size"] == micro * ds["gradient_accumulation_steps"] * dp
    assert ds["bf16"]["enabled"] and "optimizer" not in ds and "scheduler" not in ds  # the run config owns those
    if pp > 1:  # every stream of the pipeline tuple needs its gradient (pipeline_engine.py)
        assert ds["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
        assert ds["gradient_accumulation_steps"] >= 2 * pp  # enough micro-batches to fill the pipeline
    argv = ["--preset", preset, "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), "--zero", str(zero),
            "--micro-batch", str(micro), "--dtype", "bf16", "--gpu-gib", "80", "--json"]
    assert estimate_memory.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits_gpu"] and result["total_gib"] <= 80, result


RECIPES = sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_sets_its_data_workers(name):
    """data.num_workers is chosen per recipe (launchers/CLUSTER.md, "Data workers"), never the default 0."""
    from vlmo_large.training.run_config import load_run_config, read_mapping
    path = os.path.join(REPO, "configs", name)
    assert read_mapping(path)["data"]["num_workers"] >= 1, name
    cfg = load_run_config(path)  # every key valid
    if name.startswith("cluster_"):
        assert cfg.preset == name[len("cluster_"):-len(".yaml")] and cfg.data.num_workers >= 2
