"""The launcher end to end on the synthetic shards (2 ranks, ZeRO-1): a process killed while
writing a checkpoint leaves it incomplete, and `--resume auto` continues from the last complete
one with the same losses (data position and RNG restored) as the uninterrupted run."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file

from tests.conftest import seed_store
from tests.training.conftest import run_torchrun, zero1_launch_args
from tools.convert_checkpoint import main as convert_checkpoint
from vlmo_large.checkpoint import PlainCheckpoint, load_sharded_plain
from vlmo_large.formats.rel_pos_tables import split_tables
from vlmo_large.model import build_model


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_skips_an_interrupted_checkpoint_and_matches(tmp_path, dataset, zero1_launch, store_template):
    run, started = zero1_launch  # the uninterrupted run (a session fixture, read-only)
    started.result()
    full = metrics(run)
    assert [h["step"] for h in full] == [1, 2, 3, 4]
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000002", "step00000004"]
    assert (ckpt / "latest").read_text() == "step00000004"

    # the same directory as if the process had died while writing step 4
    crashed = tmp_path / "crashed"
    shutil.copytree(ckpt, crashed / "checkpoints")
    os.remove(crashed / "checkpoints" / "step00000004" / "COMPLETE")
    seed_store(store_template, crashed / "mlflow.db")
    run_torchrun(zero1_launch_args(crashed, dataset, "--resume", "auto"))
    resumed = metrics(crashed)
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("loss", "itc", "itm", "mlm"):
            assert abs(a[key] - b[key]) < 1e-6, (key, a, b)

    exported = load_file(str(crashed / "export" / "model.safetensors"))
    reference = load_file(str(run / "export" / "model.safetensors"))
    assert exported.keys() == reference.keys()
    assert max((exported[k] - reference[k]).abs().max().item() for k in exported) < 1e-6
    assert json.loads((crashed / "export" / "config.json").read_text())["name"] == "tiny"
    # the export stands alone: from-plain needs no model flags (config.json is beside the weights)
    sharded = crashed / "tp2"
    assert convert_checkpoint(["from-plain", str(crashed / "export"), str(sharded), "--tp", "2"]) == 0
    model = build_model(PlainCheckpoint(str(crashed / "export")).config())  # its config: config.json
    load_sharded_plain(model, str(sharded))  # the two TP shards merged back in one process
    weights = split_tables(exported)
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
