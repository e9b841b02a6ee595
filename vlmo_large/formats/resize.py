"""Weights of one model shape into another at load time (`--init`, evaluation): what fine-tuning
changes about the shapes of pretrained tensors.

- Another image size: each block's relative table has its 2-D image block resampled to the new grid
  (BEiT's geometric interpolation, model/relative_position.py resample_table, with the three image
  CLS rows kept and the text rows unchanged, docs/MODEL.md section 2); absolute positions (presets
  with `use_abs_pos_emb`) are resampled bicubically on the patch grid, the CLS position kept.
- A third modality-type row (NLVR2's second image, num_modality_types 3): the rows the file lacks
  start as a copy of its image row (row 1), as the reference initialises them.

Tensors are full (unsharded), by the model's names (each block's own relative table).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from vlmo_large.config import ModelConfig
from vlmo_large.formats.io import CheckpointError
from vlmo_large.model.backbone import IMAGE_ROW
from vlmo_large.model.relative_position import resample_table, table_rows

_BLOCK_TABLE = re.compile(r"^backbone\.blocks\.\d+\.rel_pos\.table$")
POS_EMBED = "backbone.patch_embed.pos_embed"
MODALITY = "backbone.modality_embed.weight"


def grid_of_table(rows: int, text_span: int, name: str) -> int:
    """The image grid g of a relative table with `rows` rows: (2g-1)^2 + 3 + 2 * text_span + 2."""
    image = rows - 3 - 2 * text_span - 2
    side = round(max(image, 0) ** 0.5)
    if side * side != image or side % 2 == 0:
        raise CheckpointError(f"tensor '{name}' has {rows} rows, which fit no image grid with a text span of "
                              f"{text_span} (max_text_len_of_initckpt)")
    return (side + 1) // 2


def resample_positions(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g0^2, D] absolute positions -> [1, 1 + grid^2, D]: bicubic on the patch grid."""
    old = round((pos_embed.shape[1] - 1) ** 0.5)
    if old == grid:
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], 1)


def adapt_to_config(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` with the tensors whose shape follows the image size or the modality rows made to fit
    `cfg`; returns (state, one note per converted tensor kind). Everything else passes unchanged
    (a shape mismatch there is load_into's to report)."""
    out, notes, resampled = dict(state), [], []
    rows = table_rows(cfg.grid_size, cfg.max_text_len_of_initckpt)
    for name, table in state.items():
        if _BLOCK_TABLE.match(name) and table.ndim == 2 and table.shape[0] != rows:
            old = grid_of_table(table.shape[0], cfg.max_text_len_of_initckpt, name)
            out[name] = resample_table(table, old, cfg.grid_size)
            resampled.append(old)
    if resampled:
        notes.append(f"relative tables of {len(resampled)} blocks resampled (grid {resampled[0]} -> {cfg.grid_size})")
    pos = state.get(POS_EMBED)
    if pos is not None and pos.ndim == 3 and pos.shape[1] != cfg.num_patches + 1:
        out[POS_EMBED] = resample_positions(pos, cfg.grid_size)
        notes.append(f"{POS_EMBED} resampled ({pos.shape[1] - 1} -> {cfg.num_patches} patches)")
    modality = state.get(MODALITY)
    if modality is not None and IMAGE_ROW < modality.shape[0] < cfg.num_modality_types:
        extra = modality[IMAGE_ROW:IMAGE_ROW + 1].expand(cfg.num_modality_types - modality.shape[0], -1)
        out[MODALITY] = torch.cat([modality, extra], 0)
        added = range(modality.shape[0], cfg.num_modality_types)
        notes.append(f"{MODALITY}: row{'s' if len(added) > 1 else ''} {', '.join(map(str, added))} start as "
                     f"the image row ({IMAGE_ROW})")
    return out, notes
