"""VLMo as a DeepSpeed `PipelineModule`: embeddings, one layer per MoME block, norm + heads.

Stages are balanced by parameter count with the embedding and head layers counted
(partition_method="parameters"; "uniform" or "type:BlockLayer" also work). DeepSpeed counts by
building every layer on every rank; here each layer is built on the meta device for that, so no
rank allocates another stage's weights.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from deepspeed.pipe import LayerSpec, PipelineModule

from vlmo_large.config import ModelConfig
from vlmo_large.parallel import state
from vlmo_large.parallel.pipeline_layers import STAGE_MODES, BlockLayer, EmbeddingLayer, HeadLayer
from vlmo_large.training.pipeline_losses import PipelineLoss, mode_terms


class MoMEPipeline(PipelineModule):
    def __init__(self, cfg: ModelConfig, stage: str, topology, partition_method: str = "parameters"):
        if stage not in STAGE_MODES:
            raise ValueError(f"unknown pretraining stage '{stage}'; choose one of {sorted(STAGE_MODES)}")
        group = state.tp_group()  # the layers split their weights over it (created by the engine's set-up)
        specs = ([LayerSpec(EmbeddingLayer, cfg, stage, tp_group=group)]
                 + [LayerSpec(BlockLayer, cfg, stage, i, tp_group=group) for i in range(cfg.depth)]
                 + [LayerSpec(HeadLayer, cfg, stage, tp_group=group)])
        super().__init__(specs, topology=topology, loss_fn=PipelineLoss(STAGE_MODES[stage][0]),
                         partition_method=partition_method)
        self.cfg, self.stage, self.mode = cfg, stage, None
        if isinstance(self.forward_funcs[-1], HeadLayer):  # the last stage: its loss applies the heads
            self.loss_fn.head = self.forward_funcs[-1]
        self.set_mode(STAGE_MODES[stage][0])

    def _count_layer_params(self) -> list[int]:
        with torch.device("meta"):
            return [sum(p.numel() for p in spec.build().parameters()) for spec in self._layer_specs]

    def set_mode(self, mode: str) -> None:
        """Switch every local layer and the loss to `mode` (all ranks must switch together)."""
        if mode not in STAGE_MODES[self.stage]:
            raise ValueError(f"stage {self.stage} runs modes {STAGE_MODES[self.stage]}, not '{mode}'")
        for layer in self.forward_funcs:
            layer.mode = mode
        self.loss_fn.mode = mode
        self.mode = mode

    def get_additional_losses(self):
        """The loss terms of the last micro-batch; zeros with the same keys on the other stages,
        which only read how many there are."""
        names = mode_terms(self.mode)
        if not names:
            return None
        terms = self.loss_fn.terms
        if terms is None or list(terms) != list(names):
            return OrderedDict((name, torch.zeros(())) for name in names)
        return terms
