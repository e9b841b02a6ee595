"""`--init`: start a stage from weights of an earlier one.

Accepted: a safetensors/torch weights file, a plain checkpoint folder (an export dir, a split
folder with model.safetensors.index.json, or a `from-plain --tp N` sharded folder of any TP size),
or a DeepSpeed checkpoint dir of any TP x ZeRO layout. Nothing is unpickled with code: DeepSpeed
files go through this project's weights-only reader (vlmo_large/checkpoint).
"""
from __future__ import annotations

import os

from vlmo_large.formats.io import CheckpointError, LoadReport, load_into, load_torch_file
from vlmo_large.parallel import state
from vlmo_large.parallel.sharding import local_state_dict
from vlmo_large.training.checkpointing import find_resume_tag


def _deepspeed_tag(path: str) -> tuple[str, str] | None:
    found = find_resume_tag(path)
    if found is None and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            found = (path, f.read().strip())
    return found


def read_full_weights(path: str, preset: str | None = None) -> dict:
    """Full (unsharded) fp32 VLMo tensors from any of the accepted sources."""
    if os.path.isfile(path):
        return load_torch_file(path)
    from vlmo_large.checkpoint.plain import PlainCheckpoint
    try:
        plain = PlainCheckpoint(path)
        return {name: plain.get(name) for name in plain.names()}
    except CheckpointError as exc:
        if "not a plain checkpoint" not in str(exc):
            raise
    found = _deepspeed_tag(path)
    if found is None:
        raise CheckpointError(f"{path}: neither a weights file, a plain checkpoint folder nor a DeepSpeed "
                              f"checkpoint dir with a complete checkpoint")
    from vlmo_large.checkpoint.convert import full_tensor, open_deepspeed
    ckpt, _, layout, to_ds = open_deepspeed(found[0], preset=preset, tag=found[1])
    return {name: full_tensor(ckpt, layout, to_ds, name) for name in layout}


def load_init_weights(model, path: str) -> LoadReport:
    """Copy matching tensors into `model` (this TP rank's slices); returns what matched."""
    sharded = os.path.isfile(os.path.join(path, "sharded.json")) if os.path.isdir(path) else False
    if sharded:
        from vlmo_large.checkpoint import load_sharded_plain
        return load_sharded_plain(model, path)
    full = read_full_weights(path, preset=None)
    if state.tp_size() > 1:
        full = local_state_dict(model, full, state.tp_rank(), state.tp_size())
    return load_into(model, full, source=path)
