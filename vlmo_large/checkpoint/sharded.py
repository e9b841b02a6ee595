"""Plain weights pre-split for a TP x PP run, and the loader a training or fine-tuning run's
`--init` calls.

Layout of a sharded folder: `tp{r}_of{N}.safetensors` per TP rank (with PP > 1:
`tp{r}_of{N}-pp{s}_of{P}.safetensors`, split by the pipeline's rule, parallel/layout.py
stage_of), `config.json`, and
`sharded.json` naming each tensor's stage file. Tensors keep this project's names; each rank reads
only its own files.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn
from tqdm import tqdm

from vlmo_large.checkpoint.layout import check_shape, local_shape, model_layout
from vlmo_large.checkpoint.plain import CONFIG_NAME, PlainCheckpoint, config_to_dict
from vlmo_large.checkpoint.safetensors_stream import write_streamed
from vlmo_large.config import ModelConfig
from vlmo_large.formats.io import CheckpointError, LoadReport
from vlmo_large.parallel.layout import check_pipeline_depth, stage_of
from vlmo_large.model.tensor_parallel import placement, shard, unshard

MANIFEST = "sharded.json"


def shard_file(rank: int, tp: int, stage: int, pp: int) -> str:
    return f"tp{rank}_of{tp}.safetensors" if pp == 1 else f"tp{rank}_of{tp}-pp{stage}_of{pp}.safetensors"


def write_sharded(plain_path: str, out_dir: str, tp: int, pp: int = 1, cfg: ModelConfig | None = None) -> list[str]:
    """Plain checkpoint -> per-(TP rank, PP stage) safetensors files; one tensor in memory at a time."""
    plain = PlainCheckpoint(plain_path)
    cfg = cfg or plain.config()
    if cfg is None:
        raise CheckpointError(f"{plain_path}: no config.json; pass --preset or --config")
    cfg.validate(tensor_parallel=tp)
    check_pipeline_depth(cfg, pp)
    if plain.naming != "vlmo_large":
        raise CheckpointError(f"{plain_path} uses {plain.naming} tensor names; turn it into this project's layout "
                              "with `import-reference` first (it also initialises what that layout lacks)")
    layout = model_layout(cfg, {name: plain.shape(name) for name in plain.names()})  # a fine-tuned model's heads too
    for name in layout:
        if name not in plain:
            raise CheckpointError(f"{plain_path}: tensor '{name}' of preset '{cfg.name}' is missing")
    os.makedirs(out_dir, exist_ok=True)
    files, weight_map = [], {}
    with tqdm(total=len(layout) * tp, desc="from-plain", unit="tensor") as bar:
        for rank in range(tp):
            for stage in range(pp):
                names = [n for n in layout if stage_of(n, cfg.depth, pp) == stage]
                file = shard_file(rank, tp, stage, pp)
                entries = [(n, local_shape(layout[n], tp), torch.float32) for n in names]

                def fetch(name: str, rank=rank) -> torch.Tensor:
                    full = plain.get(name).float()
                    check_shape(name, full.shape, layout[name].shape, plain.file_of(name))
                    place = layout[name].place
                    return (full if place is None else shard(full, *place, rank, tp)).contiguous()

                write_streamed(os.path.join(out_dir, file), entries, fetch, {"format": "pt"},
                               on_tensor=lambda _: bar.update())
                files.append(file)
                if rank == 0:
                    weight_map.update({n: stage for n in names})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump({"tensor_parallel": tp, "pipeline_parallel": pp, "stage_of": weight_map}, f, indent=2)
    return files


def _read_manifest(path: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {os.path.join(path, MANIFEST)}: {exc}") from exc


def load_sharded_plain(model: nn.Module, path: str) -> LoadReport:
    """Load weights into this process's (TP-local, possibly one PP stage's) `model`.

    `path` is a sharded folder (any TP size: a different one is re-split on the fly) or a plain
    checkpoint. Call it before `deepspeed.initialize` (ZeRO-3 partitions the parameters there).
    Every tensor the model has must be in the checkpoint with the right shape.
    """
    from vlmo_large.parallel import state

    world = getattr(model, "tp_size", 1)  # the model's own split: a one-process model needs no process group
    rank = state.tp_rank() if world > 1 else 0
    params = dict(model.named_parameters())
    own = model.state_dict()
    if os.path.isfile(os.path.join(path, MANIFEST)):
        manifest = _read_manifest(path)
        saved_tp, pp = manifest["tensor_parallel"], manifest["pipeline_parallel"]
        stage_map = manifest["stage_of"]
        ranks = [rank] if saved_tp == world else list(range(saved_tp))
        opened = {}

        def reader(r: int, stage: int) -> PlainCheckpoint:
            key = (r, stage)
            if key not in opened:
                opened[key] = PlainCheckpoint(os.path.join(path, shard_file(r, saved_tp, stage, pp)))
            return opened[key]

        def local(name: str) -> torch.Tensor:
            if name not in stage_map:
                raise CheckpointError(f"{path}: tensor '{name}' is not in {MANIFEST} (a checkpoint of another preset?)")
            pieces = [reader(r, stage_map[name]).get(name) for r in ranks]
            if saved_tp == world:
                return pieces[0]
            place = _place(params, name)
            full = pieces[0] if place is None else unshard(pieces, *place)
            return full if place is None else shard(full, *place, rank, world)
    else:
        plain = PlainCheckpoint(path)

        def local(name: str) -> torch.Tensor:
            place = _place(params, name)
            full = plain.get(name)
            return full if place is None else shard(full, *place, rank, world)

    report = LoadReport()
    with torch.no_grad():
        for name, target in own.items():
            tensor = local(name)
            check_shape(name, tensor.shape, target.shape, path)
            target.copy_(tensor)
            report.loaded.append(name)
    return report


def _place(params: dict, name: str):
    return placement(params[name]) if name in params else None
