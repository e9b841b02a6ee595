"""DeepSpeed checkpoints (TP=2 x DP=2 ZeRO-1, DP=2 ZeRO-3, TP=2 bf16) -> plain -> one process, and
plain -> TP=2 shards -> two processes: the model computes what the trained sharded model computed."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoint.conftest import assert_outputs_equal, torchrun
from tests.checkpoint.ds_train import probe_outputs
from vlmo_large.checkpoint import (PlainCheckpoint, import_reference, load_sharded_plain, to_plain,
                                   write_sharded)
from vlmo_large.config import get_preset
from vlmo_large.formats.io import CheckpointError
from vlmo_large.formats.rel_pos_tables import split_tables
from vlmo_large.model import build_model

HERE = os.path.dirname(os.path.abspath(__file__))


def plain_outputs(path: str) -> dict:
    torch.manual_seed(123)  # any init: every tensor is overwritten
    model = build_model("tiny").eval()
    report = load_sharded_plain(model, path)
    assert not report.missing
    return probe_outputs(model)


def test_zero3_to_plain_equals_trained_model(zero3_run, tmp_path):
    out = tmp_path / "plain"
    to_plain(str(zero3_run.ckpt), str(out))
    assert_outputs_equal(plain_outputs(str(out)), zero3_run.probe)
    with open(out / "config.json") as f:
        assert json.load(f)["name"] == "tiny"
    # the same tensors as DeepSpeed's own consolidation
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(zero3_run.ckpt))
    ours = split_tables(load_file(str(out / "model.safetensors")))
    assert all(torch.equal(t, theirs["model." + n]) for n, t in ours.items())


def test_tp2_dp2_to_plain_and_back_to_tp2(tp2_dp2_run, tmp_path):
    plain = tmp_path / "plain"
    to_plain(str(tp2_dp2_run.ckpt), str(plain))
    assert_outputs_equal(plain_outputs(str(plain)), tp2_dp2_run.probe)

    sharded = tmp_path / "tp2"
    files = write_sharded(str(plain), str(sharded), tp=2)
    assert files == ["tp0_of2.safetensors", "tp1_of2.safetensors"]
    torchrun(os.path.join(HERE, "sharded_probe.py"), [sharded, tmp_path / "tp2_probe.pt"], nproc=2)
    assert_outputs_equal(torch.load(tmp_path / "tp2_probe.pt", weights_only=True), tp2_dp2_run.probe)
    # a TP=2 x PP=2 split, read back by one TP=1 process (re-split on the fly)
    write_sharded(str(plain), str(tmp_path / "tp2pp2"), tp=2, pp=2)
    assert len(list((tmp_path / "tp2pp2").glob("tp*_of2-pp*_of2.safetensors"))) == 4
    assert_outputs_equal(plain_outputs(str(tmp_path / "tp2pp2")), tp2_dp2_run.probe)


def test_reference_format_round_trip(tp2_dp2_run, tmp_path):
    ref = tmp_path / "ref"
    to_plain(str(tp2_dp2_run.ckpt), str(ref), naming="reference")
    names = set(PlainCheckpoint(str(ref)).names())
    assert {"transformer.blocks.3.mlp_vl.fc1.weight", "relative_position_bias_table", "logit_vl_scale"} <= names
    # reference releases are torch files under a wrapper
    state = load_file(str(ref / "model.safetensors"))
    assert state["logit_scale"].shape == state["logit_vl_scale"].shape == ()  # 0-dim, as the reference has them
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "vlmo.pth")
    back = tmp_path / "back"
    report = import_reference(str(tmp_path / "vlmo.pth"), str(back), get_preset("tiny"))
    assert [n for n in report.missing if not n.startswith("mim_head.")] == []  # only the MIM head is new
    model = build_model("tiny").eval()
    load_sharded_plain(model, str(back))
    assert "mim_head.mask_token" in PlainCheckpoint(str(back))  # initialised, so the folder is complete
    assert_outputs_equal(probe_outputs(model), tp2_dp2_run.probe)
    # from-plain wants this project's names, and says so
    with pytest.raises(CheckpointError, match="import-reference"):
        write_sharded(str(ref), str(tmp_path / "ref_tp2"), tp=2, cfg=get_preset("tiny"))


def test_bf16_training_to_plain(bf16_run, tmp_path):
    out = tmp_path / "plain"
    to_plain(str(bf16_run.ckpt), str(out))
    ours = PlainCheckpoint(str(out))
    assert ours.get("backbone.norm.weight").dtype == torch.float32  # the fp32 masters
    # the bf16 weights the run computed with are the masters rounded
    assert_outputs_equal(plain_outputs(str(out)), bf16_run.probe, atol=0.05)
    to_plain(str(bf16_run.ckpt), str(tmp_path / "bf16"), dtype=torch.bfloat16)
    tag = next(p for p in bf16_run.ckpt.iterdir() if p.is_dir())
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    half = PlainCheckpoint(str(tmp_path / "bf16")).get("backbone.norm.weight")
    assert half.dtype == torch.bfloat16 and torch.equal(half, module["model.backbone.norm.weight"])


def test_split_by_size_with_index(zero3_run, tmp_path):
    to_plain(str(zero3_run.ckpt), str(tmp_path / "one"))
    files = to_plain(str(zero3_run.ckpt), str(tmp_path / "split"), max_shard_bytes=400_000)
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(tmp_path / "split" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    one, split = PlainCheckpoint(str(tmp_path / "one")), PlainCheckpoint(str(tmp_path / "split"))
    assert sorted(one.names()) == sorted(split.names())
    assert all(torch.equal(one.get(n), split.get(n)) for n in one.names())
