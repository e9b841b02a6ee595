"""The relative position bias of VLMo (docs/MODEL.md section 2).

Each MoME block owns its layer's table [(2g-1)^2 + 3 + 2*T0 + 2, heads] (g = image grid,
T0 = max_text_len_of_initckpt); every layer reads it at the same index. On disk the layers' tables
sit side by side as the reference's merged table [rows, layers * heads] (formats/rel_pos_tables.py
converts). Rows:
  [0, (2g-1)^2)            image patch pairs, BEiT's 2-D index
  +0 / +1 / +2             image CLS->*, *->image CLS, CLS<->CLS
  +3 / +4                  text->image, image->text
  then 1-D text distances  (sized for T0 text positions)
  last three               text CLS row, text CLS column, text CLS corner
Under tensor parallelism each rank holds the columns of its own heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table
from torch import nn


def image_relative_index(grid: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    num_2d = (2 * grid - 1) ** 2
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :] = num_2d
    index[:, 0] = num_2d + 1
    index[0, 0] = num_2d + 2
    return index


def table_rows(grid: int, text_span: int) -> int:
    return (2 * grid - 1) ** 2 + 3 + 2 * text_span + 2


def text_relative_index(text_len: int, grid: int, text_span: int) -> torch.Tensor:
    image_slots = (2 * grid - 1) ** 2 + 3
    total = table_rows(grid, text_span)
    pos = torch.arange(text_len - 1)
    rel = pos[None, :] - pos[:, None] - (2 - text_span) + image_slots + 2
    index = torch.zeros(text_len, text_len, dtype=torch.long)
    index[1:, 1:] = rel
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


def pair_relative_index(text_len: int, grid: int, text_span: int) -> torch.Tensor:
    """Index for the fused sequence [text (text_len) ; image CLS + patches]."""
    image_slots = (2 * grid - 1) ** 2 + 3
    n_img = grid * grid + 1
    text_to_image = torch.full((text_len, n_img), image_slots, dtype=torch.long)
    image_to_text = torch.full((n_img, text_len), image_slots + 1, dtype=torch.long)
    top = torch.cat([text_relative_index(text_len, grid, text_span), text_to_image], 1)
    bottom = torch.cat([image_to_text, image_relative_index(grid)], 1)
    return torch.cat([top, bottom], 0)


def resample_table(table: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """Resample the 2-D image block to another grid (BEiT's geometric interpolation, via timm)."""
    if old_grid == new_grid:
        return table
    old_image = (2 * old_grid - 1) ** 2 + 3
    new_image = (2 * new_grid - 1) ** 2 + 3
    image = resize_rel_pos_bias_table(table[:old_image].float(), new_window_size=(new_grid, new_grid),
                                      new_bias_shape=(new_image, table.shape[1]),
                                      old_window_size=(old_grid, old_grid))
    return torch.cat([image.to(table.dtype), table[old_image:]], 0)


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}  # shared by every block: one index per pass shape and device


def relative_index(mode: str, text_len: int, grid: int, text_span: int, device) -> torch.Tensor:
    """The [L, L] row index of mode image / text / pair, cached per shape and device."""
    key = (mode, text_len, grid, text_span, str(device))
    if key not in _INDEX_CACHE:
        if mode == "image":
            index = image_relative_index(grid)
        elif mode == "text":
            index = text_relative_index(text_len, grid, text_span)
        else:
            index = pair_relative_index(text_len, grid, text_span)
        _INDEX_CACHE[key] = index.to(device)
    return _INDEX_CACHE[key]


class RelativePositionBias(nn.Module):
    """One layer's table [rows, local_heads] and its bias for a pass."""

    def __init__(self, grid: int, text_span: int, local_heads: int):
        super().__init__()
        self.grid, self.text_span, self.local_heads = grid, text_span, local_heads
        self.table = nn.Parameter(torch.zeros(table_rows(grid, text_span), local_heads))

    def forward(self, mode: str, text_len: int = 0) -> torch.Tensor:
        """The contiguous bias [local_heads, L, L] of mode image / text / pair."""
        index = relative_index(mode, text_len, self.grid, self.text_span, self.table.device)
        if self.table.device.type == "cpu":
            return self._gather_columns(index)
        return self._gather_rows(index)

    def _gather_columns(self, index: torch.Tensor) -> torch.Tensor:
        """Gathered from the transposed table: laid out [heads, L, L] as gathered, the gradient
        scattered straight back into the table. On a CPU this skips the row gather's transposing
        copy. Not on a GPU: there the scatter's atomics pile onto a few table rows, and it has no
        deterministic kernel."""
        n = index.shape[0]
        return torch.gather(self.table.t(), 1, index.view(1, -1).expand(self.local_heads, -1)).view(-1, n, n)

    def _gather_rows(self, index: torch.Tensor) -> torch.Tensor:
        """One embedding lookup of the rows (sort-based, deterministic-capable backward on a GPU),
        permuted to [heads, L, L]."""
        n = index.shape[0]
        return F.embedding(index.view(-1), self.table).view(n, n, self.local_heads).permute(2, 0, 1).contiguous()
