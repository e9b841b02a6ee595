"""An encoder pass (tasks/base.py EncoderPass) in three pieces, so that one process and the pipeline
run the same code: `embed` (the first pipeline stage), `run` over blocks [start, end) (every stage
its own), `finish` (the final norm, the last stage). `encode` chains them over every block (one
process). The routing of blocks is the backbone's (MoMEBackbone.run_span, which its
encode_image / encode_text / encode_pair run over every block).

Between blocks a pass is a PassState: the sequence, the text padding mask it was embedded with
(None for an image pass) and, from layer vl_start on, the VL branch of a unimodal pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vlmo_large.model.backbone import IMAGE_ROW


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

    def detach(self) -> "PassOutput":
        return PassOutput(self.x.detach(), None if self.vl is None else self.vl.detach())


def embed(model, spec, inp: PassInput) -> PassState:
    mask_token = None if inp.mim_mask is None else model.mim_head.mask_token
    x = model.backbone.embed(spec.mode, inp.ids, inp.image, inp.modality_row, inp.mim_mask, mask_token)
    return PassState(x, None if spec.mode == "image" else inp.mask)


def run(model, spec, state: PassState, start: int, end: int) -> PassState:
    """Blocks [start, end) of the pass (the backbone's routing of a span)."""
    keep = spec.kept(0 if state.mask is None else state.mask.shape[1])
    x, vl = model.backbone.run_span(state.x, spec.mode, state.mask, start, end, keep, spec.vl_branch, state.vl)
    return PassState(x, state.mask, vl)


def finish(model, state: PassState) -> PassOutput:
    norm = model.backbone.norm
    return PassOutput(norm(state.x), None if state.vl is None else norm(state.vl))


def encode(model, spec, inp: PassInput) -> PassOutput:
    """The whole pass in one process."""
    return finish(model, run(model, spec, embed(model, spec, inp), 0, model.cfg.depth))
