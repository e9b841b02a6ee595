"""VLMo as a DeepSpeed `PipelineModule`: embeddings, one layer per MoME block, norm + heads.

Stages split by parallel/layout.py's rule (stage_blocks), the one the checkpoint splitter and the
memory estimator use, instead of DeepSpeed's balancing (which builds every layer to count it).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from deepspeed.pipe import LayerSpec, PipelineModule

from vlmo_large.config import ModelConfig
from vlmo_large.parallel import state
from vlmo_large.parallel.layout import pipeline_parts
from vlmo_large.parallel.pipeline_layers import STAGE_MODES, BlockLayer, EmbeddingLayer, HeadLayer
from vlmo_large.training.pipeline_losses import PipelineLoss, mode_terms


class MoMEPipeline(PipelineModule):
    def __init__(self, cfg: ModelConfig, stage: str, topology):
        if stage not in STAGE_MODES:
            raise ValueError(f"unknown pretraining stage '{stage}'; choose one of {sorted(STAGE_MODES)}")
        group = state.tp_group()  # the layers split their weights over it (created by the engine's set-up)
        specs = ([LayerSpec(EmbeddingLayer, cfg, stage, tp_group=group)]
                 + [LayerSpec(BlockLayer, cfg, stage, i, tp_group=group) for i in range(cfg.depth)]
                 + [LayerSpec(HeadLayer, cfg, stage, tp_group=group)])
        super().__init__(specs, topology=topology, loss_fn=PipelineLoss(STAGE_MODES[stage][0]))
        self.cfg, self.stage, self.mode = cfg, stage, None
        if isinstance(self.forward_funcs[-1], HeadLayer):  # the last stage: its loss applies the heads
            self.loss_fn.head = self.forward_funcs[-1]
        self.set_mode(STAGE_MODES[stage][0])

    def _partition_layers(self, method: str = "uniform") -> None:
        """DeepSpeed's partition hook (called by its __init__): the layer bounds of stage_blocks."""
        self.parts = pipeline_parts(len(self._layer_specs) - 2, self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

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
