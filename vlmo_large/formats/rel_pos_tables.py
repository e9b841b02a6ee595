"""The relative position tables: one per block in memory, one merged table on disk.

In the model each MoME block owns its layer's table, `backbone.blocks.{i}.rel_pos.table`
[rows, heads] (a TP rank: its own heads), so a pipeline stage holds only its blocks' tables and
every name is the same with and without a pipeline. Plain checkpoints, training exports and the
reference format keep the reference's layout: one merged table `backbone.rel_pos.table`
[rows, depth * heads], column `layer * heads + head` (docs/MODEL.md). The functions here are the
only place that converts: writers of plain files merge, readers split.
"""
from __future__ import annotations

import re

import torch

from vlmo_large.formats.io import CheckpointError

MERGED = "backbone.rel_pos.table"
_BLOCK_TABLE = re.compile(r"^backbone\.blocks\.(\d+)\.rel_pos\.table$")
_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.")


def block_table(layer: int) -> str:
    return f"backbone.blocks.{layer}.rel_pos.table"


def disk_groups(names) -> dict[str, list[str]]:
    """On-disk name -> the model tensors it holds, in the order of `names`: the block tables become
    MERGED (their columns side by side, in layer order) where the first of them stood; every other
    name holds itself."""
    names = list(names)
    tables = sorted((n for n in names if _BLOCK_TABLE.match(n)), key=block_of_table)
    groups = {}
    for name in names:
        if _BLOCK_TABLE.match(name):
            groups.setdefault(MERGED, tables)
        else:
            groups[name] = [name]
    return groups


def merge_tables(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict (full tensors) -> the plain on-disk layout."""
    return {disk: torch.cat([state[n] for n in parts], 1) if disk == MERGED else state[disk]
            for disk, parts in disk_groups(state).items()}


def block_columns(names, merged_shape, source: str = "<memory>") -> dict[str, slice]:
    """Each block table's columns in the merged table of a plain file holding `names` (its blocks
    tell the depth: a plain file holds every block's norm)."""
    depth = 1 + max((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), default=-1)
    if depth < 1 or len(merged_shape) != 2 or merged_shape[1] % depth:
        raise CheckpointError(f"{source}: tensor '{MERGED}' of shape {tuple(merged_shape)} does not split into "
                              f"{depth} layers' tables (as many as the file's blocks)")
    heads = merged_shape[1] // depth
    return {block_table(i): slice(i * heads, (i + 1) * heads) for i in range(depth)}


def split_tables(state: dict[str, torch.Tensor], source: str = "<memory>") -> dict[str, torch.Tensor]:
    """A plain (on-disk) state dict -> the model's names: MERGED becomes one table per block
    (column views, no copy), where it stood. Everything else, and a dict without MERGED, passes
    unchanged."""
    if MERGED not in state:
        return state
    columns = block_columns(state, state[MERGED].shape, source)
    out = {}
    for name, tensor in state.items():
        if name == MERGED:
            out.update({block: tensor[:, cols] for block, cols in columns.items()})
        else:
            out[name] = tensor
    return out


def block_of_table(name: str) -> int | None:
    """The layer whose table `name` is, or None for any other tensor."""
    m = _BLOCK_TABLE.match(name)
    return None if m is None else int(m.group(1))
