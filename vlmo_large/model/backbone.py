"""The MoME backbone: embeddings, the blocks (each with its relative-bias table), one final norm.

Encoder modes (spec section 1): `encode_image` (vision expert everywhere), `encode_text` (language
expert everywhere), `encode_pair` (fused, text first: text/vision experts below `vl_start`, the
vision-language expert from there up). With `vl_branch=True` the image-only and text-only passes
also run their layer `vl_start - 1` states through the top layers in VL mode, the features of
pretraining's second ITC loss.

`encode_image_and_text` (stage 3's two unimodal passes) runs them separately, or, with
`cfg.pack_unimodal`, as one packed pass: [text ; image] per sample, the "pair" route and relative
bias (whose diagonal blocks are the text and image biases), attention kept block-diagonal
(`separate`). Fewer, longer block calls; DropPath then draws one decision per sample for its text
and image together (equal to separate passes without drop path). docs/PERFORMANCE.md says when it pays.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn

from vlmo_large.config import ModelConfig
from vlmo_large.model.block import MoMEBlock, apply_checkpointing
from vlmo_large.model.flex_attention import padding_block_masks
from vlmo_large.model.embeddings import ImageEmbeddings, TextEmbeddings
from vlmo_large.model.tensor_parallel import group_size

TEXT_ROW, IMAGE_ROW, SECOND_IMAGE_ROW = 0, 1, 2  # modality-type rows; the third only with num_modality_types 3 (NLVR2)


class MoMEBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None):
        """tp_group: the tensor-parallel group the weights are split over (None: one process)."""
        super().__init__()
        self.tp_group = tp_group  # model/initialization.py slices the TP weights for this group's rank
        tp = self.tp_size = group_size(tp_group)
        cfg.validate(tensor_parallel=tp)
        self.cfg = cfg
        self.text_embeddings = TextEmbeddings(cfg, tp_group)
        self.patch_embed = ImageEmbeddings(cfg)
        self.modality_embed = nn.Embedding(cfg.num_modality_types, cfg.embed_dim)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(MoMEBlock(cfg, i, rates[i], tp_group) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        apply_checkpointing(self.blocks, cfg.checkpoint_every)  # parallelize applies its plan again

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute every `every`-th block in backward (0 turns it off); the mechanism parallelize uses."""
        apply_checkpointing(self.blocks, every)

    # -- embeddings -----------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_embeddings(ids) + self.modality_embed.weight[TEXT_ROW]

    def embed_image(self, images: torch.Tensor, modality_row: int = IMAGE_ROW,
                    mim_mask: Optional[torch.Tensor] = None,
                    mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.patch_embed(images, mim_mask, mask_token) + self.modality_embed.weight[modality_row]

    # -- blocks ---------------------------------------------------------------------------------
    def _bias(self, mode: str, text_len: int):
        return None if not self.cfg.use_rel_pos_bias else PassBias(self.blocks, mode, text_len)

    def run_blocks(self, x: torch.Tensor, routes: list[str], bias, key_mask=None, text_len: int = 0,
                   start: int = 0, end: Optional[int] = None, keep: Optional[int] = None,
                   separate: bool = False) -> torch.Tensor:
        """Blocks [start, end). keep=n returns only the first n positions, which the last block
        computes alone (exactly the same numbers: keys and values still come from every position).
        separate: x packs two sequences, [:text_len] and [text_len:], that do not attend to each
        other (needs key_mask)."""
        end = self.cfg.depth if end is None else end
        if keep is not None and start >= end:
            return x[:, :keep]
        block_masks = {}
        if key_mask is not None and start < end and self.blocks[start].attn.may_use_flex(x.device):
            block_masks = padding_block_masks(key_mask, x.shape[1], keep,  # one per pass, shared by its layers
                                              text_len if separate else None)
        for i in range(start, end):
            layer_bias = None if bias is None else bias[i]
            queries = keep if i == end - 1 else None
            block_mask = block_masks.get(x.shape[1] if queries is None else queries)
            x = self.blocks[i](x, routes[i], layer_bias, key_mask, text_len, queries, block_mask, separate)
        return x

    def _single_modality(self, x, expert: str, bias_mode: str, key_mask, text_len: int, vl_branch: bool,
                         keep: Optional[int]):
        cfg = self.cfg
        bias = self._bias(bias_mode, text_len)
        x = self.run_blocks(x, [expert] * cfg.depth, bias, key_mask, text_len, end=cfg.vl_start)
        if vl_branch:
            vl = self.run_blocks(x, ["vl"] * cfg.depth, bias, key_mask, text_len, start=cfg.vl_start, keep=keep)
        x = self.run_blocks(x, [expert] * cfg.depth, bias, key_mask, text_len, start=cfg.vl_start, keep=keep)
        return (self.norm(x), self.norm(vl)) if vl_branch else self.norm(x)

    # -- encoder modes --------------------------------------------------------------------------
    # keep=n: return only the first n positions (1: the CLS token), skipping the last layer's work
    # for the others; the returned values are those of the full forward.
    def encode_image(self, images: torch.Tensor, vl_branch: bool = False, modality_row: int = IMAGE_ROW,
                     mim_mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None,
                     keep: Optional[int] = None):
        x = self.embed_image(images, modality_row, mim_mask, mask_token)
        return self._single_modality(x, "imag", "image", None, 0, vl_branch, keep)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, vl_branch: bool = False, keep: Optional[int] = None):
        x = self.embed_text(ids)
        return self._single_modality(x, "text", "text", _padding_mask(mask), ids.shape[1], vl_branch, keep)

    def encode_image_and_text(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        """The unimodal passes of stage 3's ITC: ((image, image_vl), (text, text_vl)), each [B, 1, D]
        (CLS only), final and VL-branch; packed into one pass when cfg.pack_unimodal is set."""
        if self.cfg.pack_unimodal:
            return self._packed_image_and_text(images, ids, mask)
        image = self.encode_image(images, vl_branch=True, keep=1)
        text = self.encode_text(ids, mask, vl_branch=True, keep=1)
        return image, text

    def _packed_image_and_text(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        """encode_image_and_text as one pass over [text ; image] with block-diagonal attention: the
        "pair" route (text expert on the text, vision expert on the image) below vl_start and for
        the main top layers, "vl" for the VL branch. The last layers compute the first T + 1
        positions, which hold both CLS rows (text at 0, image at T)."""
        cfg, T = self.cfg, ids.shape[1]
        image = self.embed_image(images)
        x = torch.cat([self.embed_text(ids), image], 1)
        # always a key mask, unpadded text too: the separation is applied where padding is
        key_mask = torch.cat([mask.bool(), torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)], 1)
        run = partial(self.run_blocks, bias=self._bias("pair", T), key_mask=key_mask, text_len=T, separate=True)
        x = run(x, ["pair"] * cfg.depth, end=cfg.vl_start)
        vl = run(x, ["vl"] * cfg.depth, start=cfg.vl_start, keep=T + 1)
        x = run(x, ["pair"] * cfg.depth, start=cfg.vl_start, keep=T + 1)
        return ((self.norm(x[:, T:T + 1]), self.norm(vl[:, T:T + 1])),
                (self.norm(x[:, :1]), self.norm(vl[:, :1])))

    def encode_pair(self, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor,
                    modality_row: int = IMAGE_ROW, keep: Optional[int] = None) -> torch.Tensor:
        """Fused encoder over [text ; image]; returns the final-normed sequence (text first)."""
        text = self.embed_text(ids)
        image = self.embed_image(images, modality_row)
        x = torch.cat([text, image], 1)
        key_mask = _padding_mask(mask)
        if key_mask is not None:  # image positions are never padded
            key_mask = torch.cat([key_mask, torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)], 1)
        cfg, text_len = self.cfg, ids.shape[1]
        routes = ["pair"] * cfg.vl_start + ["vl"] * cfg.num_vl_layers
        return self.norm(self.run_blocks(x, routes, self._bias("pair", text_len), key_mask, text_len, keep=keep))


class PassBias:
    """The relative bias of one pass, per layer: block i's own table gathered at the pass's index
    when layer i first asks, then kept, so the VL branch and the main path share one gather."""

    def __init__(self, blocks, mode: str, text_len: int):
        self.blocks, self.mode, self.text_len, self.layers = blocks, mode, text_len, {}

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            self.layers[layer] = self.blocks[layer].rel_pos(self.mode, self.text_len)
        return self.layers[layer]


def _padding_mask(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The key mask attention needs, or None when no position is padded: an unpadded batch skips a
    [B, heads, L, L] masking pass in every layer. Checked on the host only: on a GPU the check
    would stall the kernel queue once per pass, for a pass that the fused kernel barely notices."""
    mask = mask.bool()
    return None if mask.device.type == "cpu" and bool(mask.all()) else mask
