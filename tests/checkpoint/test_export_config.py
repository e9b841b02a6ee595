"""A training export is one folder that every reader understands: model.safetensors in the plain
layout and config.json (the name PlainCheckpoint, from-plain and --init read); exports written
before config.json was the one name (model_config.json) still load."""
import os

import torch
from safetensors.torch import load_file

from tests.conftest import randomize_
from vlmo_large.checkpoint.plain import CONFIG_NAME, LEGACY_EXPORT_CONFIG, PREPROCESSING_NAME, PlainCheckpoint, write_export
from vlmo_large.formats.rel_pos_tables import MERGED, split_tables
from vlmo_large.model import build_model


def test_export_folder_carries_its_config_and_the_merged_table(tmp_path):
    model = randomize_(build_model("tiny", drop_path_rate=0.0))
    write_export(str(tmp_path), model.state_dict(), model.cfg)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, "model.safetensors", PREPROCESSING_NAME]  # no temporary files left
    ckpt = PlainCheckpoint(str(tmp_path))
    assert ckpt.config() == model.cfg
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert MERGED in on_disk  # the reference layout on disk
    weights = split_tables(on_disk)
    assert weights.keys() == model.state_dict().keys() == set(ckpt.names())  # the reader splits it back
    assert all(torch.equal(weights[k], v) and torch.equal(ckpt.get(k), v) for k, v in model.state_dict().items())


def test_an_export_with_the_former_config_name_still_reads(tmp_path):
    model = build_model("tiny", embed_dim=32, num_heads=4)
    write_export(str(tmp_path), model.state_dict(), model.cfg)
    os.rename(tmp_path / CONFIG_NAME, tmp_path / LEGACY_EXPORT_CONFIG)
    assert PlainCheckpoint(str(tmp_path)).config() == model.cfg
