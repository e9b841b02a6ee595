"""timm / BEiT vision weights -> the vision path of this project's model.

BEiT's block is the MoME block with a single expert, so its FFN and norm2 go to the vision expert
(`mlp` -> `experts.imag`), the rest keeps its place, and the per-layer (or shared) relative tables
fill the image rows of each block's own table. Text embeddings, the
language and VL experts and the text rows of the table stay as initialised and are reported.
"""
from __future__ import annotations

import re

import torch

from vlmo_large.formats.io import CheckpointError, LoadReport, load_into, load_torch_file
from vlmo_large.formats.rel_pos_tables import block_table
from vlmo_large.model.relative_position import resample_table

_RENAMES = [
    (r"^cls_token$", "backbone.patch_embed.cls_token"),
    (r"^pos_embed$", "backbone.patch_embed.pos_embed"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"backbone.patch_embed.proj.\1"),
    (r"^norm\.(weight|bias)$", r"backbone.norm.\1"),
    (r"^blocks\.(\d+)\.(norm1\.weight|norm1\.bias|gamma_1|gamma_2)$", r"backbone.blocks.\1.\2"),
    (r"^blocks\.(\d+)\.attn\.(q_bias|v_bias|qkv\.weight|proj\.weight|proj\.bias)$", r"backbone.blocks.\1.attn.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"backbone.blocks.\1.experts.imag.norm.\2"),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"backbone.blocks.\1.experts.imag.\2.\3"),
    (r"^mask_token$", "mim_head.mask_token"),
]
_LAYER_TABLE = re.compile(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$")
_SHARED_TABLE = re.compile(r"^rel_pos_bias\.relative_position_bias_table$")
_BUFFERS = re.compile(r"relative_position_index$|k_bias$")
# BEiT names its layer scale lambda_1/2 in some releases.
_ALIASES = {"lambda_1": "gamma_1", "lambda_2": "gamma_2"}


def from_beit(state: dict[str, torch.Tensor], model) -> tuple[dict, list[str], list[str]]:
    """Returns (this project's state dict, unused BEiT keys, converted keys)."""
    cfg = model.cfg
    out, unused, converted, tables = {}, [], [], {}
    for name, tensor in state.items():
        for alias, real in _ALIASES.items():
            name = name.replace(alias, real)
        if _BUFFERS.search(name):
            continue
        if (m := _LAYER_TABLE.match(name)):
            tables[int(m.group(1))] = tensor
            continue
        if _SHARED_TABLE.match(name):
            tables.update({layer: tensor for layer in range(cfg.depth)})
            continue
        for pattern, target in _RENAMES:
            if re.match(pattern, name):
                out[re.sub(pattern, target, name)] = tensor
                break
        else:
            unused.append(name)
    if tables:
        if not cfg.use_rel_pos_bias:
            raise ValueError(f"BEiT weights hold relative position tables but preset '{cfg.name}' "
                             "uses absolute positions (use_rel_pos_bias=False)")
        out.update(_block_tables(tables, model, converted))
    return out, unused, converted


def _block_tables(tables: dict[int, torch.Tensor], model, converted: list[str]) -> dict[str, torch.Tensor]:
    """Per-layer BEiT tables [(2g-1)^2 + 3, H] into the image rows of each block's table."""
    cfg = model.cfg
    heads, out = cfg.num_heads, {}
    for layer, table in sorted(tables.items()):
        name = f"blocks.{layer}.attn.relative_position_bias_table"
        if layer >= cfg.depth or table.ndim != 2 or table.shape[1] != heads:
            raise CheckpointError(f"tensor '{name}' of shape {tuple(table.shape)} does not fit preset "
                                  f"'{cfg.name}' ({cfg.depth} layers of {heads} heads)")
        old_grid = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
        if old_grid != cfg.grid_size:
            table = resample_table(table, old_grid, cfg.grid_size)
            converted.append(f"blocks.{layer}.attn.relative_position_bias_table (grid {old_grid} -> {cfg.grid_size})")
        own = model.backbone.blocks[layer].rel_pos.table.detach().clone()
        own[: table.shape[0]] = table
        out[block_table(layer)] = own
    return out


def load_beit_checkpoint(model, path_or_state) -> LoadReport:
    """Load a timm/BEiT checkpoint file (or state dict) into the vision path of `model` (TP=1)."""
    source = path_or_state if isinstance(path_or_state, str) else "<state dict>"
    state = load_torch_file(path_or_state) if isinstance(path_or_state, str) else path_or_state
    converted_state, unused, converted = from_beit(state, model)
    report = load_into(model, converted_state, source=source)
    report.unexpected += unused
    report.converted += converted
    return report
