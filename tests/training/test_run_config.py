"""Each configuration problem is one `error: ...` line naming it, exit status 2, before training."""
import json
import os
import subprocess
import sys

import pytest

from tests.training.conftest import REPO
from vlmo_large.config import get_preset
from vlmo_large.training.run_config import ConfigError, load_run_config
from vlmo_large.training.validation import resolve_run

DS_ZERO3 = {"zero_optimization": {"stage": 3}}


def resolve(overrides, ds=DS_ZERO3, world=1, text=None, tmp_path=None):
    path = None
    if text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(text)
    cfg = load_run_config(str(path) if path else None, ["data.source=random", "batch.micro=2", *overrides])
    return resolve_run(cfg, ds, world)


@pytest.mark.parametrize("overrides, ds, world, message", [
    (["optim.lrr=1"], DS_ZERO3, 1, "unknown config key 'optim.lrr'"),
    (["schedule.steps=abc"], DS_ZERO3, 1, "config key 'schedule.steps' must be int or null, got str 'abc'"),
    (["seed=1.5"], DS_ZERO3, 1, "config key 'seed' must be int"),
    (["model.num_headz=3"], DS_ZERO3, 1, "unknown config key 'model.num_headz' (known in this section: "),
    (["batch.micro=3"], {"train_batch_size": 8, **DS_ZERO3}, 2,
     "train_batch_size=8 != micro (3) * grad_accum (1) * data-parallel size (2) = 6"),
    (["batch.micro=2", "batch.grad_accum=2"], {"gradient_accumulation_steps": 4, **DS_ZERO3}, 1,
     "batch.grad_accum=2 disagrees with gradient_accumulation_steps=4"),
    (["parallel.tp=3"], DS_ZERO3, 3, "tensor parallel size 3 does not divide num_heads=4 of 'tiny'"),
    (["parallel.tp=2"], DS_ZERO3, 3, "world size 3 is not divisible by parallel.tp (2)"),
    (["parallel.pp=2"], DS_ZERO3, 2, "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only: "
                                     "set zero_optimization.stage to 1"),
    (["model.compile=true"], DS_ZERO3, 1, "model.compile=true with zero_optimization.stage=3: ZeRO-3's parameter "
     "hooks are torch.compiler.disable'd functions, which a whole-graph compiled block cannot call"),
    (["stage=mlm"], DS_ZERO3, 1, "stage='mlm' must be one of mim, text_mlm, vl"),
    (["batch.micro=1"], DS_ZERO3, 1, "stage 'vl' needs at least 2 samples"),
    (["model.vl_start=4"], DS_ZERO3, 1, "stage 'vl' reads its passes' VL branch, which needs vision-language "
                                        "layers: model.vl_start=4 must be below model.depth=4"),
    ([], {"optimizer": {"type": "Adam"}, **DS_ZERO3}, 1, "the DeepSpeed config sets 'optimizer'"),
    (["data.source=shards", "data.shards=/nonexistent/shard-{000..003}.tar"], DS_ZERO3, 1,
     "data.shards: shard pattern '/nonexistent/shard-{000..003}.tar' matches no files"),
    (["init=/nonexistent/weights.safetensors"], DS_ZERO3, 1, "init: checkpoint not found: /nonexistent/weights.safetensors"),
])
def test_config_error_names_the_problem(overrides, ds, world, message):
    with pytest.raises(ConfigError) as err:
        resolve(overrides, ds, world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_tokenizer_file(tmp_path):
    shard = tmp_path / "shard-000.tar"
    shard.write_bytes(b"")
    with pytest.raises(ConfigError, match=f"data.tokenizer: file not found: {tmp_path}/vocab.txt"):
        resolve(["data.source=shards", f"data.shards={shard}", f"data.tokenizer={tmp_path}/vocab.txt"])


def test_yaml_and_overrides_build_a_valid_run(tmp_path):
    resolved = resolve(["optim.lr=3e-4", "batch.grad_accum=2"], {"zero_optimization": {"stage": 1}}, 2,
                       text="preset: tiny\nschedule: {steps: 7, warmup: 2}\nmodel: {drop_path_rate: 0.05}\n", tmp_path=tmp_path)
    ds = resolved.ds_config
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01}
    assert resolved.model.drop_path_rate == 0.05


@pytest.mark.parametrize("yaml_text, overrides", [
    ("model: {embed_dim: abc}\n", []), ("", ["model.embed_dim=abc"])])
def test_model_overrides_are_typed_in_yaml_and_on_the_command_line(tmp_path, yaml_text, overrides):
    (tmp_path / "run.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_run_config(str(tmp_path / "run.yaml"), overrides)  # when read, before any resolution
    assert str(err.value) == "config key 'model.embed_dim' must be int, got str 'abc'"


def test_model_overrides_replace_only_the_keys_given(tmp_path):
    resolved = resolve(["model.num_heads=8", "model.layer_scale_init=null"], tmp_path=tmp_path,
                       text="model: {embed_dim: 128, drop_path_rate: 0}\n")
    expected = get_preset("tiny").replace(embed_dim=128, num_heads=8, layer_scale_init=None, drop_path_rate=0.0)
    assert resolved.model == expected
    assert isinstance(resolved.model.drop_path_rate, float)  # YAML's 0, as the field's type


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_compiled_blocks_run_with_zero_below_3(zero):
    assert resolve(["model.compile=true"], {"zero_optimization": {"stage": zero}}).model.compile is True


def test_model_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="config section 'model' must be a mapping, got 3"):
        load_run_config(None, ["model=3"])


def test_launcher_prints_one_error_line_and_exits_2(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(DS_ZERO3))
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "pretrain.py"), "--ds_config", str(ds),
                             "--local_rank=0", "data.source=random", "schedule.stepz=3"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'schedule.stepz' (known in this section: decay, epoch_samples, epochs, min_lr_ratio, "
        "steps, warmup, warmup_ratio)"]


def test_launcher_reports_a_missing_ds_config(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "pretrain.py"),
                             "--ds_config", str(tmp_path / "none.json")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read config file {tmp_path / 'none.json'}: No such file or directory"]
