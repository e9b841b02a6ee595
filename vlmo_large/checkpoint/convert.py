"""Conversions into a plain checkpoint: from a DeepSpeed checkpoint of any TP x DP x ZeRO layout
(and TP x PP x DP x ZeRO-0/1 pipeline checkpoints),
from a reference VLMo checkpoint, and from BEiT/timm vision weights."""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from vlmo_large.checkpoint.deepspeed_reader import DeepSpeedCheckpoint
from vlmo_large.checkpoint.pipeline_reader import PipelineCheckpoint, open_checkpoint
from vlmo_large.checkpoint.layout import (check_shape, local_shape, model_layout, name_prefix, resolve_config,
                                          strip_prefix)
from vlmo_large.checkpoint.plain import (CONFIG_NAME, LEGACY_EXPORT_CONFIG, PlainCheckpoint, config_to_dict,
                                         write_plain, write_plain_dict)
from vlmo_large.config import ModelConfig, get_preset
from vlmo_large.formats.io import CheckpointError, LoadReport, load_into, load_torch_file
from vlmo_large.formats.rel_pos_tables import MERGED, disk_groups, merge_tables
from vlmo_large.formats.reference import (REFERENCE_SCALARS, finetuned_config, finetuned_heads, from_reference,
                                          reference_buffers, save_reference_pt, to_reference)
from vlmo_large.model.tensor_parallel import unshard

CONFIG_KEYS = ("model_config", "model_cfg", "config")
VOCAB_TENSORS = ("backbone.text_embeddings.word_embeddings.weight", "mlm_head.decoder.weight", "mlm_head.decoder.bias")


def stored_config(ckpt: DeepSpeedCheckpoint) -> tuple[dict | None, str]:
    """The model config a trainer left in client_state, or a config.json beside the checkpoint."""
    where = ckpt.ranks[0].model_file
    for key in CONFIG_KEYS:
        value = ckpt.client_state.get(key)
        if isinstance(value, dict) and "embed_dim" in value:
            return value, f"{where} (client_state['{key}'])"
    run = ckpt.client_state.get("run_config")  # the trainer's: a preset plus ModelConfig overrides
    if isinstance(run, dict) and isinstance(run.get("preset"), str):
        cfg = get_preset(run["preset"], **(run.get("model") or {}))
        return dataclasses.asdict(cfg), f"{where} (client_state['run_config'])"
    for folder in (ckpt.folder, os.path.dirname(ckpt.folder.rstrip("/"))):
        for name in (CONFIG_NAME, LEGACY_EXPORT_CONFIG):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path) as f:
                    return json.load(f), path
    return None, ckpt.folder


def open_deepspeed(ckpt_path: str, preset: str | None = None, config_path: str | None = None,
                   tag: str | None = None):
    """-> (checkpoint, model config, layout, {our name: checkpoint name}); checks names and presence.
    A fine-tuned run's classifier and modality-type rows come from the stored shapes (formats/reference.py
    finetuned_config, finetuned_heads), whatever the config says."""
    ckpt = open_checkpoint(ckpt_path, tag)
    found, source = stored_config(ckpt)
    cfg = resolve_config(preset, config_path, found, source)
    prefix = name_prefix(ckpt.names(), set(model_layout(cfg)), ckpt.folder)
    shapes = {name[len(prefix):]: shape for name, shape in ckpt.shapes().items() if name.startswith(prefix)}
    cfg = finetuned_config(shapes, cfg)
    layout = model_layout(cfg, shapes)
    to_ds = {ours: ds for ds, ours in strip_prefix(ckpt.names(), set(layout), ckpt.folder).items()}
    for name in layout:
        if name not in to_ds:
            raise CheckpointError(f"{ckpt.folder}: tensor '{name}' of preset '{cfg.name}' is not in the checkpoint")
    if isinstance(ckpt, PipelineCheckpoint):
        ckpt.bind(layout)
    origin = "the command line" if preset or config_path else source
    print(f"reading {ckpt.describe()}; model '{cfg.name}', config from {origin}")
    return ckpt, cfg, layout, to_ds


def full_tensor(ckpt: DeepSpeedCheckpoint, layout: dict, to_ds: dict, name: str, key: str = "fp32") -> torch.Tensor:
    """One full (TP-gathered) fp32 tensor: master weights or an Adam moment."""
    info = layout[name]
    if isinstance(ckpt, PipelineCheckpoint):
        tensor = ckpt.full_tensor(to_ds[name], key)
        check_shape(name, tensor.shape, info.shape, ckpt.folder)
        return tensor
    shards = ckpt.shards(to_ds[name], key)
    for rank, piece in enumerate(shards):
        check_shape(to_ds[name], piece.shape, local_shape(info, ckpt.tp), ckpt.ranks[rank].model_file)
    return shards[0] if info.place is None else unshard(shards, *info.place)


REFERENCE_PT = "model.pt"  # to-plain --format reference-pt: the reference's torch file


def to_plain(ckpt_path: str, out_dir: str, preset: str | None = None, config_path: str | None = None,
             naming: str = "vlmo_large", dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10 ** 9,
             tag: str | None = None) -> list[str]:
    """DeepSpeed checkpoint -> plain safetensors folder (fp32 master weights unless `dtype`).

    naming "reference" writes the reference's tensor names (and its `position_ids` buffer);
    "reference-pt" the same as one torch file `model.pt` ({"state_dict": ...}) for its torch 1.8."""
    ckpt, cfg, layout, to_ds = open_deepspeed(ckpt_path, preset, config_path, tag)
    reference = naming in ("reference", "reference-pt")
    groups = disk_groups(layout)  # plain name -> the model tensors it holds (the merged relative table)
    names = to_reference({n: n for n in groups}) if reference else {n: n for n in groups}
    buffers = reference_buffers(cfg) if reference else {}
    out_dtype = dtype or torch.float32

    def shape(out: str) -> torch.Size:
        if reference and out in REFERENCE_SCALARS:
            return torch.Size(())
        parts = [layout[ours].shape for ours in groups[names[out]]]
        return torch.Size(parts[0]) if len(parts) == 1 else torch.Size((parts[0][0], sum(p[1] for p in parts)))

    shapes = {out: shape(out) for out in names}
    entries = [(out, shapes[out], out_dtype) for out in names] + [(n, t.shape, t.dtype) for n, t in buffers.items()]

    def fetch(out_name: str) -> torch.Tensor:
        if out_name in buffers:
            return buffers[out_name]
        tensor = torch.cat([full_tensor(ckpt, layout, to_ds, ours) for ours in groups[names[out_name]]], 1) \
            if names[out_name] == MERGED else full_tensor(ckpt, layout, to_ds, names[out_name])
        return tensor.reshape(shapes[out_name]).to(out_dtype).contiguous()

    if naming == "reference-pt":
        os.makedirs(out_dir, exist_ok=True)
        save_reference_pt({name: fetch(name) for name, _, _ in entries}, os.path.join(out_dir, REFERENCE_PT))
        with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
            json.dump(config_to_dict(cfg, "reference"), f, indent=2)
        return [REFERENCE_PT]
    return write_plain(out_dir, entries, fetch, cfg, naming, max_shard_bytes, desc="to-plain")


def resize_vocab(state: dict[str, torch.Tensor], cfg: ModelConfig, allow: bool, source: str,
                 report: LoadReport) -> None:
    """Copy the overlapping rows of vocabulary-sized tensors; the rest is initialised (std 0.02)."""
    for name in VOCAB_TENSORS:
        if name not in state or state[name].shape[0] == cfg.vocab_size:
            continue
        old = state[name]
        if not allow:
            raise CheckpointError(f"{source}: tensor '{name}' has {old.shape[0]} vocabulary rows, preset "
                                  f"'{cfg.name}' has vocab_size {cfg.vocab_size}; pass --resize-vocab to copy "
                                  "the overlapping rows and initialise the rest")
        new = torch.zeros((cfg.vocab_size, *old.shape[1:]), dtype=old.dtype)
        if name.endswith("weight"):
            torch.nn.init.trunc_normal_(new, std=0.02, a=-0.04, b=0.04)
        keep = min(old.shape[0], cfg.vocab_size)
        new[:keep] = old[:keep]
        state[name] = new
        report.converted.append(f"{name} (vocabulary {old.shape[0]} -> {cfg.vocab_size} rows)")


def import_reference(path: str, out_dir: str, cfg: ModelConfig, resize: bool = False, seed: int = 0,
                     naming: str = "vlmo_large", max_shard_bytes: int = 5 * 10 ** 9) -> LoadReport:
    """Reference VLMo .pt/.pth (any wrapper) -> plain checkpoint; tensors not in the file stay as initialised.
    A fine-tuned file brings its classifier and modality-type rows (formats/reference.py finetuned_heads)."""
    from vlmo_large.model import build_model

    state, unused, converted = from_reference(load_torch_file(path), cfg)
    shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    cfg = finetuned_config(shapes, cfg)
    report = LoadReport(converted=converted)
    resize_vocab(state, cfg, resize, path, report)
    torch.manual_seed(seed)
    model = build_model(cfg, heads=finetuned_heads(shapes, cfg))
    loaded = load_into(model, state, source=path)
    report.loaded, report.missing = loaded.loaded, loaded.missing
    report.unexpected = loaded.unexpected + unused
    _write_model(model, out_dir, cfg, naming, max_shard_bytes)
    return report


def export_reference(plain_path: str, out_path: str, preset: str | None = None,
                     config_path: str | None = None) -> None:
    """A plain checkpoint (a training export; fine-tuning heads included) -> one torch file as the
    reference loads it ({"state_dict": ...}: its names, its buffers; the MIM head is left out)."""
    plain = PlainCheckpoint(plain_path)
    cfg = resolve_config(preset, config_path, plain.config_dict(), plain_path)
    state = plain.state_dict()
    if plain.naming != "reference":
        state = to_reference(state)
    save_reference_pt({**reference_buffers(cfg), **state}, out_path)


def import_beit(path: str, out_dir: str, cfg: ModelConfig, seed: int = 0, naming: str = "vlmo_large",
                max_shard_bytes: int = 5 * 10 ** 9) -> LoadReport:
    """BEiT/timm vision checkpoint -> plain checkpoint with the vision path filled."""
    from vlmo_large.formats.beit import load_beit_checkpoint
    from vlmo_large.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    report = load_beit_checkpoint(model, path)
    _write_model(model, out_dir, cfg, naming, max_shard_bytes)
    return report


def _write_model(model, out_dir: str, cfg: ModelConfig, naming: str, max_shard_bytes: int) -> None:
    state = merge_tables({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    if naming == "reference":
        state = {**to_reference(state), **reference_buffers(cfg)}
    write_plain_dict(out_dir, state, cfg, naming, max_shard_bytes)
