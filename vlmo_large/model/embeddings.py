"""Text and image embeddings (docs/MODEL.md section 2). The modality-type rows are added by the backbone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmo_large.config import ModelConfig
from vlmo_large.model.tensor_parallel import vocab_embedding


class TextEmbeddings(nn.Module):
    """BERT-style: word (vocab-parallel) + token-type row 0 [+ absolute position] -> LayerNorm -> dropout.

    base and large keep a position table (it is in the reference checkpoints and parameter counts)
    but do not add it: their text positions come from the relative bias alone.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.word_embeddings = vocab_embedding(cfg.vocab_size, cfg.embed_dim, tp_group)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.embed_dim)
        self.token_type_embeddings = nn.Embedding(2, cfg.embed_dim)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.text_norm_eps)
        self.dropout = nn.Dropout(cfg.text_dropout_rate)
        self.use_positions = cfg.use_abs_pos_emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        if self.use_positions:
            x = x + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.norm(x))


class ImageEmbeddings(nn.Module):
    """Conv patches + CLS [+ absolute positions]; `mim_mask` swaps masked patches for a mask token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = (nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
                          if cfg.use_abs_pos_emb else None)

    def _positions(self, grid: int) -> torch.Tensor:
        """Absolute positions, bicubic-resampled when the image grid differs from the table's."""
        table_grid = int((self.pos_embed.shape[1] - 1) ** 0.5)
        if grid == table_grid:
            return self.pos_embed
        patches = self.pos_embed[:, 1:].reshape(1, table_grid, table_grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.to(self.pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
        return torch.cat([self.pos_embed[:, :1], patches], 1)

    def forward(self, images: torch.Tensor, mim_mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj(images)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        if mim_mask is not None:
            keep = (~mim_mask).unsqueeze(-1).type_as(x)
            x = x * keep + mask_token.type_as(x) * (1 - keep)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).type_as(x), x], 1)
        if self.pos_embed is not None:
            x = x + self._positions(grid).type_as(x)
        return x
