"""`--init`: start a stage from weights of an earlier one.

Accepted: a safetensors/torch weights file, a plain checkpoint folder (an export dir, a split
folder with model.safetensors.index.json, or a `from-plain --tp N` sharded folder of any TP size),
or a DeepSpeed checkpoint dir of any TP x ZeRO layout. Nothing is unpickled with code: DeepSpeed
files go through this project's weights-only reader (vlmo_large/checkpoint).
"""
from __future__ import annotations

import os

from vlmo_large.errors import UserError
from vlmo_large.formats.io import CheckpointError, LoadReport, load_into, load_torch_file
from vlmo_large.formats.rel_pos_tables import split_tables
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
    """Full (unsharded) fp32 VLMo tensors from any of the accepted sources, by the model's names
    (a merged relative table is split into the blocks' own)."""
    if os.path.isfile(path):
        return split_tables(load_torch_file(path), path)
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
    """Copy matching tensors into `model` (this TP rank's slices); returns what matched.

    Every problem with `path` is a CheckpointError naming it (the launcher prints one line)."""
    try:
        report = _load_init_weights(model, path)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"--init {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from exc
    from vlmo_large.formats.reference import our_name
    renamed = [n for n in report.unexpected if our_name(n) in report.missing]
    if renamed or not report.loaded:
        raise CheckpointError(f"--init {path}: " + (f"tensor '{renamed[0]}' (and {len(renamed) - 1} more) uses the "
                              "reference's names; convert it with `tools/convert_checkpoint.py import-reference`"
                              if renamed else f"none of its tensors is one of the model's (first: "
                              f"'{(report.unexpected or ['-'])[0]}')"))
    return report


def _load_init_weights(model, path: str) -> LoadReport:
    sharded = os.path.isfile(os.path.join(path, "sharded.json")) if os.path.isdir(path) else False
    if sharded:
        from vlmo_large.checkpoint import load_sharded_plain
        return load_sharded_plain(model, path)
    full = read_full_weights(path, preset=None)
    tp = getattr(model, "tp_size", 1)  # the model's own split: no process group is created at TP=1
    if tp > 1:
        full = local_state_dict(model, full, state.tp_rank(), tp)
    return load_into(model, full, source=path)
