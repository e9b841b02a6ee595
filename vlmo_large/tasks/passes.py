"""An encoder pass (tasks/base.py EncoderPass) in three pieces, so that one process and the pipeline
run the same code: `embed` (the first pipeline stage), `run` over blocks [start, end) (every stage
its own), `finish` (the final norm, the last stage). `encode` chains them over every block (one
process). The routes and the relative bias follow from the pass's mode as in the backbone's
encode_image / encode_text / encode_pair, which give the same numbers.

Between blocks a pass is a PassState: the sequence, the text padding mask it was embedded with
(None for an image pass) and, from layer vl_start on, the VL branch of a unimodal pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vlmo_large.model.backbone import IMAGE_ROW, _padding_mask

EXPERTS = {"image": "imag", "text": "text"}  # a unimodal pass's expert in every layer


@dataclass
class PassInput:
    """What a pass embeds: ids and mask (text, pair), images (image, pair), and for an image pass
    the MIM mask [rows, patches] whose patches the mask token replaces; modality_row: the images'
    modality-type row (NLVR2's right image: 2)."""
    ids: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    image: Optional[torch.Tensor] = None
    mim_mask: Optional[torch.Tensor] = None
    modality_row: int = IMAGE_ROW


@dataclass
class PassState:
    x: torch.Tensor
    mask: Optional[torch.Tensor]  # [rows, text length], 1 = token; None: an image pass
    vl: Optional[torch.Tensor] = None


@dataclass
class PassOutput:
    """Final-normed states of a pass (the first `keep` positions when its EncoderPass keeps some),
    and of its VL branch when it has one."""
    x: torch.Tensor
    vl: Optional[torch.Tensor] = None


def embed(model, spec, inp: PassInput) -> PassState:
    bb = model.backbone
    if spec.mode == "text":
        return PassState(bb.embed_text(inp.ids), inp.mask)
    mask_token = None if inp.mim_mask is None else model.mim_head.mask_token
    image = bb.embed_image(inp.image, inp.modality_row, mim_mask=inp.mim_mask, mask_token=mask_token)
    if spec.mode == "image":
        return PassState(image, None)
    return PassState(torch.cat([bb.embed_text(inp.ids), image], 1), inp.mask)


def run(model, spec, state: PassState, start: int, end: int) -> PassState:
    """Blocks [start, end) of the pass; the last block of the model computes only the kept positions."""
    bb, cfg = model.backbone, model.cfg
    text_len = 0 if state.mask is None else state.mask.shape[1]
    key_mask = None if state.mask is None else _padding_mask(state.mask)
    if key_mask is not None and spec.mode == "pair":  # image positions are never padded
        key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], state.x.shape[1] - text_len)], 1)
    keep = spec.kept(text_len) if end == cfg.depth else None

    def blocks(x, route, first, last, kept=None):
        return bb.run_blocks(x, route, bias, key_mask, text_len, start=first, end=last, keep=kept)

    bias = bb._bias(spec.mode, text_len)
    if spec.mode == "pair":  # modality experts below vl_start, the VL expert from there up
        return PassState(blocks(state.x, ["pair"] * cfg.vl_start + ["vl"] * cfg.num_vl_layers, start, end, keep),
                         state.mask)
    route = [EXPERTS[spec.mode]] * cfg.depth
    mid = min(max(start, cfg.vl_start), end)
    x = blocks(state.x, route, start, mid)
    vl = state.vl
    if spec.vl_branch and vl is None and start <= cfg.vl_start < end:
        vl = x  # the VL branch starts from layer vl_start - 1's states
    if vl is not None:
        vl = blocks(vl, ["vl"] * cfg.depth, mid, end, keep)
    return PassState(blocks(x, route, mid, end, keep), state.mask, vl)


def finish(model, state: PassState) -> PassOutput:
    norm = model.backbone.norm
    return PassOutput(norm(state.x), None if state.vl is None else norm(state.vl))


def encode(model, spec, inp: PassInput) -> PassOutput:
    """The whole pass in one process."""
    return finish(model, run(model, spec, embed(model, spec, inp), 0, model.cfg.depth))
