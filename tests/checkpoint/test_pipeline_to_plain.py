"""`to-plain` of pipeline checkpoints written by the launcher: PP=2 ZeRO-1 fp32 (the run of
tests/training/test_launcher_pipeline.py), PP=2 ZeRO-0 fp32 and TP=2 x PP=2 ZeRO-1 bf16. The plain folder holds every
tensor of the preset, equal to the launcher's own export, and one process computes the same."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint.conftest import assert_outputs_equal
from tests.checkpoint.ds_train import probe_outputs
from vlmo_large.formats.rel_pos_tables import split_tables
from tests.conftest import migrated_store, seed_store
from tests.training.conftest import REPO, StartedTorchrun
from tests.training.test_launcher_pipeline import launch, launcher_args, pipeline_run
from tools.convert_checkpoint import main as convert_main
from vlmo_large.checkpoint import PlainCheckpoint, to_plain
from vlmo_large.formats.rel_pos_tables import split_tables
from vlmo_large.model import build_model


def outputs_of(path: str) -> dict:
    torch.manual_seed(123)  # any init: every tensor is overwritten
    model = build_model("tiny").eval()
    plain = PlainCheckpoint(path) if os.path.isdir(path) else None
    state = {n: plain.get(n) for n in plain.names()} if plain else split_tables(load_file(path))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        return probe_outputs(model)


@pytest.fixture(scope="module")
def pp2_zero0_run(tmp_path_factory):
    """PP=2 ZeRO-0 fp32, 1 step: started when first asked for (by the bf16 test, so that the two
    runs' start-ups overlap), collected by the test that converts it."""
    data = pipeline_run(tmp_path_factory)["data"]
    out = tmp_path_factory.mktemp("pp2_zero0") / "z0"
    seed_store(migrated_store(tmp_path_factory), out / "mlflow.db")
    started = StartedTorchrun(launcher_args(out, data, "parallel.pp=2", "schedule.steps=1",
                                            ds=os.path.join(REPO, "ds_configs", "cpu_fp32_zero0.json")),
                              out.parent / "console", nproc=2, timeout=300)
    yield out, started
    started.proc.kill()


def test_pp2_fp32_to_plain_equals_the_export(tmp_path_factory, tmp_path):
    run = pipeline_run(tmp_path_factory)
    assert convert_main(["to-plain", os.path.join(run["out"], "checkpoints"), str(tmp_path / "plain")]) == 0
    exported = os.path.join(run["out"], "export", "model.safetensors")
    ours, theirs = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(exported)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert_outputs_equal(outputs_of(str(tmp_path / "plain")), outputs_of(exported), atol=1e-6)
    with open(tmp_path / "plain" / "config.json") as f:
        assert json.load(f)["name"] == "tiny"

    # --init reads the same checkpoint through the same reader
    from vlmo_large.training.initialization import read_full_weights
    init = read_full_weights(os.path.join(run["out"], "checkpoints"))  # the model's (per-block) names
    ours = split_tables(ours)
    assert init.keys() == ours.keys()
    assert all(torch.equal(init[k], ours[k]) for k in ours)


@pytest.mark.slow
def test_tp2_pp2_bf16_to_plain_equals_the_export(tmp_path_factory, tmp_path, pp2_zero0_run):
    data = pipeline_run(tmp_path_factory)["data"]
    ds = tmp_path / "bf16_zero1.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    launch(tmp_path / "run", data, 4, "parallel.pp=2", "parallel.tp=2", "schedule.steps=1", ds=str(ds),
           store=migrated_store(tmp_path_factory))
    to_plain(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "plain"))
    ours = load_file(str(tmp_path / "plain" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == torch.float32 and theirs[k].dtype == torch.bfloat16 for k in ours)
    # the fp32 master weights are what the bf16 weights were rounded from
    assert all(torch.equal(ours[k].bfloat16(), theirs[k]) for k in ours)


def test_pp2_zero0_converts_with_its_adam_moments(pp2_zero0_run, tmp_path):
    """ZeRO-0 pipeline checkpoints store no param_shapes; their Adam moments sit in each stage's
    torch optimizer state, named by the trainer's client_state. After one step from zero moments
    exp_avg = (1-b1) g and exp_avg_sq = (1-b2) g^2 for every tensor the stages hold."""
    out, started = pp2_zero0_run
    started.result()
    ckpt = str(out / "checkpoints")
    assert convert_main(["to-plain", ckpt, str(tmp_path / "plain")]) == 0
    ours = load_file(str(tmp_path / "plain" / "model.safetensors"))
    theirs = load_file(str(out / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert convert_main(["to-portable", ckpt, str(tmp_path / "portable")]) == 0
    m, v = (PlainCheckpoint(str(tmp_path / "portable" / part)) for part in ("exp_avg", "exp_avg_sq"))
    trained = [n for n in m.names() if m.get(n).abs().max() > 0]
    assert len(trained) > 100  # all but the tensors no stage holds (stage vl: the MIM head)
    from vlmo_large.checkpoint.deepspeed_reader import load_ds_file
    states = load_ds_file(os.path.join(ckpt, "step00000001", "mp_rank_00_model_states.pt"))
    beta1, beta2 = states["optimizer"]["param_groups"][0]["betas"]
    for name in trained:
        torch.testing.assert_close(v.get(name), (1 - beta2) / (1 - beta1) ** 2 * m.get(name) ** 2, rtol=1e-4,
                                   atol=1e-12, msg=name)
    with open(tmp_path / "portable" / "training_state.json") as f:
        assert json.load(f)["optimizer_step"] == 1
