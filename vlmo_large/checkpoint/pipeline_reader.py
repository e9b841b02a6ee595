"""Read a DeepSpeed *pipeline* checkpoint (TP x PP x ZeRO-0/1, fp32 or bf16) by VLMo names.

What DeepSpeed's pipeline engine (training/pipeline_module.py) writes into a tag folder:
    layer_LL-model_TT-model_states.pt   pipeline layer LL's tensors on TP rank TT, keyed by their
                                        VLMo names (e.g. "backbone.blocks.2.attn.qkv.weight"), in
                                        the training dtype
    mp_rank_MM_model_states.pt          per (stage, TP rank), MM = stage * TP + TT: param_shapes
                                        (VLMo names), client_state
    [bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   ZeRO-1 flat fp32 partitions, as without PP
Trainable tensors are read from the optimizer's fp32 master partitions (deepspeed_reader._TPRank
does that part, one per MM); frozen ones and ZeRO-0 runs from the layer files (ZeRO-0's Adam
moments from the `optimizer` of each mp_rank file, by the names the trainer stored). Files are
mmap-loaded, one tensor is materialised at a time.
"""
from __future__ import annotations

import functools
import os
import re

import torch

from vlmo_large.checkpoint.deepspeed_reader import (_LAYER, _OPTIM, DS_STATE_KEYS, DeepSpeedCheckpoint, _TPRank,
                                                    load_ds_file, resolve_tag_dir)
from vlmo_large.formats.io import CheckpointError
from vlmo_large.model.tensor_parallel import unshard

_PIPE_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def open_checkpoint(path: str, tag: str | None = None):
    """A DeepSpeedCheckpoint, or a PipelineCheckpoint where the tag holds layer files."""
    folder = resolve_tag_dir(path, tag)
    if any(_LAYER.match(f) for f in os.listdir(folder)):
        return PipelineCheckpoint(folder)
    return DeepSpeedCheckpoint(path, tag)


class PipelineCheckpoint:
    """All stages and TP ranks of one pipeline checkpoint tag. Call `bind(layout)` before reading."""

    def __init__(self, folder: str):
        self.folder = folder
        files = sorted(os.listdir(folder))
        self.layer_files = {}
        for f in files:
            if (m := _LAYER.match(f)):
                self.layer_files[int(m.group(1)), int(m.group(2))] = os.path.join(folder, f)
        model = {int(m.group(1)): os.path.join(folder, f) for f in files if (m := _PIPE_MODEL.match(f))}
        optim = {}
        for f in files:
            if (m := _OPTIM.match(f)):
                optim.setdefault(int(m.group(2)), {})[int(m.group(1))] = os.path.join(folder, f)
        if not model:
            raise CheckpointError(f"{folder}: pipeline checkpoint without mp_rank_*_model_states.pt files")
        first = load_ds_file(model[min(model)])
        dims = first.get("checkpoint_parallel_dimensions") or {}
        self.tp = int(dims.get("tp_degree") or 1 + max(t for _, t in self.layer_files))
        self.pp = int(dims.get("pp_degree") or len(model) // self.tp)
        for mp in range(self.tp * self.pp):
            if mp not in model:
                raise CheckpointError(f"missing shard file {os.path.join(folder, f'mp_rank_{mp:02d}_model_states.pt')} "
                                      f"(TP={self.tp} x PP={self.pp}: no model states of stage {mp // self.tp}, "
                                      f"TP rank {mp % self.tp})")
        self.ranks = [_TPRank(folder, mp, {0: model[mp]}, optim.get(mp, {})) for mp in range(self.tp * self.pp)]
        self.states = self.ranks[0].states
        self.stage, self.dp = self.ranks[0].stage, self.ranks[0].dp
        # name -> stage of every tensor the optimizer holds (the others: layer files)
        self.optimized = {name: mp // self.tp for mp, rank in enumerate(self.ranks)
                          if rank.stage in (1, 2) for name in rank.shapes}
        # ZeRO-0: Adam's moments (and bf16's fp32 masters) per stage, by the names the trainer stored
        self.zero0 = {name: mp // self.tp for mp, rank in enumerate(self.ranks)
                      if rank.zero0 is not None for name in rank.zero0.where}
        self.index = {name: layer for (layer, tp) in sorted(self.layer_files) if tp == 0
                      for name in self._layer_state(layer, 0)}  # name -> its layer
        self.place: dict[str, tuple | None] = {}

    # -- names -----------------------------------------------------------------------------------
    def bind(self, layout: dict) -> None:
        """The TP placement of every stored tensor, from the model's layout (checkpoint/layout.py
        model_layout of the config and these shapes, so a fine-tuned model's heads are in it)."""
        self.place = {name: layout[name].place for name in self.index}

    def names(self) -> list[str]:
        return list(self.index)

    def shapes(self) -> dict[str, tuple]:
        """{name: TP-local shape} of every stored tensor (TP rank 0's layer files)."""
        return {name: tuple(self._layer_state(layer, 0)[name].shape) for name, layer in self.index.items()}

    @property
    def client_state(self) -> dict:
        return {k: v for k, v in self.states.items() if k not in DS_STATE_KEYS}

    # -- tensors ---------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=4)  # the tensors of a layer are read one after another
    def _layer_state(self, layer: int, tp: int) -> dict:
        path = self.layer_files.get((layer, tp))
        if path is None:
            raise CheckpointError(f"missing shard file {os.path.join(self.folder, f'layer_{layer:02d}-model_{tp:02d}-model_states.pt')}")
        return load_ds_file(path)

    def _local(self, name: str, tp: int, key: str) -> torch.Tensor:
        if name in self.optimized:
            return self.ranks[self.optimized[name] * self.tp + tp].tensor(name, key)
        if name in self.zero0:
            zero0 = self.ranks[self.zero0[name] * self.tp + tp].zero0
            if key != "fp32" or zero0.has_master(name):
                return zero0.tensor(name, key)
        if key != "fp32":
            raise CheckpointError(f"{self.folder}: no optimizer state '{key}' for '{name}' (frozen, or ZeRO-0)")
        return self._layer_state(self.index[name], tp)[name].float()

    def full_tensor(self, name: str, key: str = "fp32") -> torch.Tensor:
        """One full (TP-merged) fp32 tensor."""
        if name not in self.index:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is not in the checkpoint")
        shards = [self._local(name, tp, key) for tp in range(self.tp)]
        place = self.place.get(name)
        return shards[0] if place is None else unshard(shards, *place)

    def step(self) -> int | None:
        return self.ranks[0].step()

    def describe(self) -> str:
        bf16 = any(os.path.basename(p).startswith("bf16_") for r in self.ranks for p in r.optim_files.values())
        return (f"{self.folder}: pipeline TP={self.tp} PP={self.pp} DP={self.dp} ZeRO-{self.stage} "
                f"({'bf16' if bf16 else 'fp32/fp16'} training)")
