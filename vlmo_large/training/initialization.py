"""`--init`: start a stage from weights of an earlier one.

Accepted: a safetensors/torch weights file (this project's names or the reference VLMo's, converted
in memory), a plain checkpoint folder (an export dir, a split folder with
model.safetensors.index.json, or a `from-plain --tp N` sharded folder of any TP size), or a
DeepSpeed checkpoint dir of any TP x ZeRO layout. Nothing is unpickled with code: DeepSpeed files go
through this project's weights-only reader (vlmo_large/checkpoint).

Fine-tuning starts from pretrained weights of another shape: the task's new heads are missing (they
stay as initialised), the pretraining heads the task does not use are unused, and the relative
tables / positions are resampled to the run's image size and NLVR2's third modality row added
(formats/resize.py). The report lists each.
"""
from __future__ import annotations

import os

from vlmo_large.errors import UserError
from vlmo_large.formats.io import CheckpointError, LoadReport, load_into, load_torch_file
from vlmo_large.formats.rel_pos_tables import split_tables
from vlmo_large.formats.resize import adapt_to_config
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
    if not report.loaded:
        raise CheckpointError(f"--init {path}: none of its tensors is one of the model's (first: "
                              f"'{(report.unexpected or ['-'])[0]}')")
    return report


def is_reference_layout(names) -> bool:
    """Whether tensor names are the reference VLMo's (docs/MODEL.md section 7): any name that only
    the reference uses ("transformer.blocks.0.norm1.weight", "relative_position_bias_table", ...)."""
    from vlmo_large.formats.reference import our_name
    return any(our_name(n) not in (None, n) for n in names)


def adapted_weights(full: dict, cfg, source: str) -> tuple[dict, list[str], list[str]]:
    """Full tensors of any accepted source fitted to `cfg`: reference names converted
    (formats/reference.py), relative tables and positions resampled to the image size, modality rows
    added (formats/resize.py). Returns (state, unused reference names, conversion notes)."""
    unused, notes = [], []
    if is_reference_layout(full):
        from vlmo_large.formats.reference import from_reference
        full, unused, notes = from_reference(full, cfg)
        notes = [f"reference VLMo names converted ({source})", *notes]
    full, resized = adapt_to_config(full, cfg)
    return full, unused, notes + resized


def _load_init_weights(model, path: str) -> LoadReport:
    sharded = os.path.isfile(os.path.join(path, "sharded.json")) if os.path.isdir(path) else False
    if sharded:  # a from-plain folder: written for this model's shapes
        from vlmo_large.checkpoint import load_sharded_plain
        return load_sharded_plain(model, path)
    full, unused, notes = adapted_weights(read_full_weights(path, preset=None), model.cfg, path)
    tp = getattr(model, "tp_size", 1)  # the model's own split: no process group is created at TP=1
    if tp > 1:
        full = local_state_dict(model, full, state.tp_rank(), tp)
    report = load_into(model, full, source=path)
    report.unexpected += unused
    report.converted += notes
    return report
