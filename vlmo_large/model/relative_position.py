"""The merged relative position bias of VLMo (docs/MODEL.md section 2).

One table [(2g-1)^2 + 3 + 2*T0 + 2, heads * layers] (g = image grid, T0 = max_text_len_of_initckpt)
shared by every layer; column `layer * heads + head`. Rows:
  [0, (2g-1)^2)            image patch pairs, BEiT's 2-D index
  +0 / +1 / +2             image CLS->*, *->image CLS, CLS<->CLS
  +3 / +4                  text->image, image->text
  then 1-D text distances  (sized for T0 text positions)
  last three               text CLS row, text CLS column, text CLS corner
Under tensor parallelism each rank holds the columns of its own heads in every layer.
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


class RelativePositionBias(nn.Module):
    def __init__(self, grid: int, text_span: int, depth: int, local_heads: int):
        super().__init__()
        self.grid, self.text_span, self.depth, self.local_heads = grid, text_span, depth, local_heads
        self.table = nn.Parameter(torch.zeros(table_rows(grid, text_span), depth * local_heads))
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _index(self, mode: str, text_len: int, device) -> torch.Tensor:
        key = (mode, text_len, str(device))
        if key not in self._index_cache:
            if mode == "image":
                index = image_relative_index(self.grid)
            elif mode == "text":
                index = text_relative_index(text_len, self.grid, self.text_span)
            else:
                index = pair_relative_index(text_len, self.grid, self.text_span)
            self._index_cache[key] = index.to(device)
        return self._index_cache[key]

    def forward(self, mode: str, text_len: int = 0) -> tuple[torch.Tensor, ...]:
        """One contiguous bias [local_heads, L, L] per layer, for mode image / text / pair."""
        index = self._index(mode, text_len, self.table.device)
        if self.table.device.type == "cpu":
            return self._gather_columns(index)
        return self._gather_rows(index)

    def _gather_columns(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's bias gathered from its own columns of the transposed table: laid out
        [heads, L, L] as gathered, each layer's gradient scattered straight back into the table.
        On a CPU this skips the row gather's transposing copies and gradient stack (fused base
        pass: 15 ms against 42 ms forward+backward). Not on a GPU: there the scatter's atomics pile
        onto a few table rows, and it has no deterministic kernel."""
        n, heads = index.shape[0], self.local_heads
        index = index.view(1, -1).expand(heads, -1)
        columns = self.table.t()
        return tuple(torch.gather(columns[layer * heads:(layer + 1) * heads], 1, index).view(heads, n, n)
                     for layer in range(self.depth))

    def _gather_rows(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One embedding lookup of all layers' rows (sort-based, deterministic-capable backward on a
        GPU), permuted to [layer, heads, L, L]; unbind, not indexing, so that backward stacks the
        layers' gradients instead of zero-filling a full-size one per layer."""
        n = index.shape[0]
        bias = F.embedding(index.view(-1), self.table).view(n, n, self.depth, self.local_heads)
        return bias.permute(2, 3, 0, 1).contiguous().unbind(0)
