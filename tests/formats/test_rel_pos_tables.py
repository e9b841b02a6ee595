"""Each block owns its relative table; plain files and the reference format hold the merged one."""
import pytest
import torch
from safetensors.torch import load_file

from vlmo_large.checkpoint.plain import PlainCheckpoint, write_plain_dict
from vlmo_large.formats.io import CheckpointError, load_into
from vlmo_large.formats.reference import from_reference, to_reference
from vlmo_large.formats.rel_pos_tables import MERGED, merge_tables, split_tables
from vlmo_large.model import build_model
from vlmo_large.model.relative_position import image_relative_index, pair_relative_index, text_relative_index


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.rel_pos.table.normal_()
    return model.eval()


def _merged_by_hand(model) -> torch.Tensor:
    """The reference's layout, column by column: column layer * heads + head."""
    cfg = model.cfg
    tables = [block.rel_pos.table.detach() for block in model.backbone.blocks]
    merged = torch.empty(tables[0].shape[0], cfg.depth * cfg.num_heads)
    for layer, table in enumerate(tables):
        for head in range(cfg.num_heads):
            merged[:, layer * cfg.num_heads + head] = table[:, head]
    return merged


def test_merged_table_holds_each_layer_in_its_columns(model):
    cfg = model.cfg
    state = model.state_dict()
    assert MERGED not in state and state["backbone.blocks.1.rel_pos.table"].shape[1] == cfg.num_heads
    plain = merge_tables(state)
    assert not any(".rel_pos." in n for n in plain if n != MERGED)
    assert torch.equal(plain[MERGED], _merged_by_hand(model))
    back = split_tables(plain)
    assert back.keys() == state.keys() and all(torch.equal(back[n], state[n]) for n in state)


def test_per_layer_bias_is_the_merged_table_at_the_reference_index(model):
    """The backbone's bias of layer l == merged[index][..., l*H:(l+1)*H] (the reference's math)."""
    cfg, T = model.cfg, 7
    merged, heads = _merged_by_hand(model), cfg.num_heads
    span = cfg.max_text_len_of_initckpt
    for mode, index in (("image", image_relative_index(cfg.grid_size)),
                        ("text", text_relative_index(T, cfg.grid_size, span)),
                        ("pair", pair_relative_index(T, cfg.grid_size, span))):
        bias = model.backbone._bias(mode, T)
        for layer in range(cfg.depth):
            expected = merged[index][..., layer * heads:(layer + 1) * heads].permute(2, 0, 1)
            assert torch.equal(bias[layer].detach(), expected), (mode, layer)


def test_plain_file_holds_the_merged_table_and_reads_back_by_block(model, tmp_path):
    write_plain_dict(str(tmp_path), merge_tables(model.state_dict()), model.cfg)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert MERGED in on_disk and torch.equal(on_disk[MERGED], _merged_by_hand(model))
    assert not any(n.endswith(".rel_pos.table") and n != MERGED for n in on_disk)
    plain = PlainCheckpoint(str(tmp_path))
    assert set(plain.names()) == set(model.state_dict())
    table = model.backbone.blocks[1].rel_pos.table
    assert plain.shape("backbone.blocks.1.rel_pos.table") == tuple(table.shape)
    assert torch.equal(plain.get("backbone.blocks.1.rel_pos.table"), table.detach())
    fresh = build_model("tiny")
    report = load_into(fresh, split_tables(on_disk))
    assert not report.missing and not report.unexpected
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_reference_format_round_trip(model):
    ref = to_reference(model.state_dict())
    assert torch.equal(ref["relative_position_bias_table"], _merged_by_hand(model))
    ours, unused, _ = from_reference(ref, model.cfg)
    fresh = build_model("tiny")
    load_into(fresh, ours)
    for i, block in enumerate(fresh.backbone.blocks):
        assert torch.equal(block.rel_pos.table, model.backbone.blocks[i].rel_pos.table), i


def test_a_merged_table_that_does_not_split_names_the_tensor(model):
    plain = merge_tables(model.state_dict())
    plain[MERGED] = plain[MERGED][:, :-1]
    wanted = r"some.safetensors: tensor 'backbone\.rel_pos\.table' of shape \(182, 15\) does not split into 4 "
    with pytest.raises(CheckpointError, match=wanted):
        split_tables(plain, "some.safetensors")
