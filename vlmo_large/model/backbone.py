"""The MoME backbone: embeddings, the blocks (each with its relative-bias table), one final norm.

Encoder modes (spec section 1): `encode_image` (vision expert everywhere), `encode_text` (language
expert everywhere), `encode_pair` (fused, text first: text/vision experts below `vl_start`, the
vision-language expert from there up). With `vl_branch=True` the image-only and text-only passes
also run their layer `vl_start - 1` states through the top layers in VL mode, the features of
pretraining's second ITC loss. Every pass's routing (experts, VL branch, key mask, bias, kept
positions) is `run_span` over blocks [start, end): the encoders run [0, depth), tasks/passes.py
one process's passes and each pipeline stage's blocks.

`encode_image_and_text` (stage 3's two unimodal passes) runs them separately, or, with
`cfg.pack_unimodal`, as one "packed" pass: [text ; image] per sample, the "pair" route and relative
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
# A pass's mode -> its route (block.py) below vl_start and, except a fused pair's ("vl"), from there up.
# "packed": stage 3's image and text passes as one, [text ; image] attending block-diagonally.
EXPERTS = {"image": "imag", "text": "text", "pair": "pair", "packed": "pair"}


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

    # -- one pass over a span of blocks ----------------------------------------------------------
    def embed(self, mode: str, ids: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
              modality_row: int = IMAGE_ROW, mim_mask: Optional[torch.Tensor] = None,
              mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sequence a pass of `mode` (EXPERTS) starts from: text, image, or [text ; image]."""
        if mode == "text":
            return self.embed_text(ids)
        image = self.embed_image(images, modality_row, mim_mask, mask_token)
        return image if mode == "image" else torch.cat([self.embed_text(ids), image], 1)

    def run_span(self, x: torch.Tensor, mode: str, mask: Optional[torch.Tensor] = None, start: int = 0,
                 end: Optional[int] = None, keep: Optional[int] = None, vl_branch: bool = False,
                 vl: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Blocks [start, end) of one pass of `mode` (EXPERTS) -> (x, vl), the routing of every pass:
        the whole pass is the span [0, depth), a pipeline stage runs its own span.

        mask: the text padding mask [B, T] the pass was embedded with (None: an image pass).
        keep=n: the model's last block computes only the first n positions (the same numbers).
        vl_branch: the pass's layer vl_start - 1 states also run through the top layers with the VL
        expert; `vl` carries that branch into a span starting above vl_start (None: not there yet)."""
        cfg = self.cfg
        end = cfg.depth if end is None else end
        text_len = 0 if mask is None else mask.shape[1]
        run = partial(self.run_blocks, bias=self._bias("pair" if mode == "packed" else mode, text_len),
                      key_mask=_key_mask(mode, mask, x), text_len=text_len, separate=mode == "packed")
        routes = [EXPERTS[mode]] * cfg.vl_start + ["vl" if mode == "pair" else EXPERTS[mode]] * cfg.num_vl_layers
        keep = keep if end == cfg.depth else None
        # the branch starts from layer vl_start - 1's states: in the span holding layer vl_start (without
        # VL layers, at the last block's states)
        if vl is None and not (vl_branch and start <= cfg.vl_start and (cfg.vl_start < end or end == cfg.depth)):
            return run(x, routes, start=start, end=end, keep=keep), vl
        mid = max(start, cfg.vl_start)
        x = run(x, routes, start=start, end=mid)
        vl = run(x if vl is None else vl, ["vl"] * cfg.depth, start=mid, end=end, keep=keep)  # first: drop path draws in call order
        return run(x, routes, start=mid, end=end, keep=keep), vl

    def _encode(self, x: torch.Tensor, mode: str, mask: Optional[torch.Tensor], vl_branch: bool, keep: Optional[int]):
        """The whole pass, final-normed: x, or (x, vl) with the VL branch."""
        x, vl = self.run_span(x, mode, mask, keep=keep, vl_branch=vl_branch)
        return (self.norm(x), self.norm(vl)) if vl_branch else self.norm(x)

    # -- encoder modes --------------------------------------------------------------------------
    # keep=n: return only the first n positions (1: the CLS token), skipping the last layer's work
    # for the others; the returned values are those of the full forward.
    def encode_image(self, images: torch.Tensor, vl_branch: bool = False, modality_row: int = IMAGE_ROW,
                     mim_mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None,
                     keep: Optional[int] = None):
        x = self.embed("image", images=images, modality_row=modality_row, mim_mask=mim_mask, mask_token=mask_token)
        return self._encode(x, "image", None, vl_branch, keep)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, vl_branch: bool = False, keep: Optional[int] = None):
        return self._encode(self.embed("text", ids), "text", mask, vl_branch, keep)

    def encode_image_and_text(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        """The unimodal passes of stage 3's ITC: ((image, image_vl), (text, text_vl)), each [B, 1, D]
        (CLS only), final and VL-branch; packed into one pass when cfg.pack_unimodal is set."""
        if not self.cfg.pack_unimodal:
            return (self.encode_image(images, vl_branch=True, keep=1),
                    self.encode_text(ids, mask, vl_branch=True, keep=1))
        # one "packed" pass over [text ; image]: the last layers compute the first T + 1 positions,
        # which hold both CLS rows (text at 0, image at T)
        T = ids.shape[1]
        x, vl = self.run_span(self.embed("packed", ids, images), "packed", mask, keep=T + 1, vl_branch=True)
        return ((self.norm(x[:, T:T + 1]), self.norm(vl[:, T:T + 1])),
                (self.norm(x[:, :1]), self.norm(vl[:, :1])))

    def encode_pair(self, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor,
                    modality_row: int = IMAGE_ROW, keep: Optional[int] = None) -> torch.Tensor:
        """Fused encoder over [text ; image]; returns the final-normed sequence (text first)."""
        return self._encode(self.embed("pair", ids, images, modality_row), "pair", mask, False, keep)


class PassBias:
    """The relative bias of one pass, per layer: block i's own table gathered at the pass's index
    when layer i first asks, then kept, so the VL branch and the main path share one gather."""

    def __init__(self, blocks, mode: str, text_len: int):
        self.blocks, self.mode, self.text_len, self.layers = blocks, mode, text_len, {}

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.layers:
            self.layers[layer] = self.blocks[layer].rel_pos(self.mode, self.text_len)
        return self.layers[layer]


def _key_mask(mode: str, mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """The key mask of a pass over x: the text's padding mask (None for an image pass), followed by
    ones for the image positions of a pair or packed pass (never padded). A packed pass always has
    one, unpadded text too: its separation is applied where the padding is."""
    key_mask = None if mask is None else mask.bool() if mode == "packed" else _padding_mask(mask)
    if key_mask is None or mode == "text":
        return key_mask
    return torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], x.shape[1] - mask.shape[1])], 1)


def _padding_mask(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The key mask attention needs, or None when no position is padded: an unpadded batch skips a
    [B, heads, L, L] masking pass in every layer. Checked on the host only: on a GPU the check
    would stall the kernel queue once per pass, for a pass that the fused kernel barely notices."""
    mask = mask.bool()
    return None if mask.device.type == "cpu" and bool(mask.all()) else mask
