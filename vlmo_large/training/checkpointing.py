"""Training checkpoints (DeepSpeed) that are resumable only once complete, and weight export.

Layout under the checkpoint directory:
    step00000100/           DeepSpeed's files of one checkpoint (model, optimizer, scheduler,
                            client_state: step, every rank's data position and RNG states)
    step00000100/COMPLETE   written by rank 0 after every rank returned from saving
    latest                  DeepSpeed's pointer, written by us after COMPLETE (never by DeepSpeed,
                            whose rank 0 writes it before the other ranks have finished)
A process killed while saving leaves a tag without COMPLETE: it is never resumed from and is
deleted by the next save. Only the newest `keep` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from vlmo_large.checkpoint import safe_engine
from vlmo_large.checkpoint.deepspeed_reader import PARAM_NAMES
from vlmo_large.checkpoint.plain import ExportExtras, write_export
from vlmo_large.checkpoint.portable import STATE_FILE
from vlmo_large.checkpoint.resume_checks import current_layout, describe, refuse_layout_change, tag_problem
from vlmo_large.errors import UserError
from vlmo_large.formats.io import CheckpointError
from vlmo_large.parallel import state
from vlmo_large.parallel.sharding import gather_full_state_dict

MARKER = "COMPLETE"
TAG = re.compile(r"step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tags with a completion marker, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if TAG.match(t) and os.path.isfile(os.path.join(ckpt_dir, t, MARKER))]
    return sorted(tags, key=lambda t: int(TAG.match(t).group(1)))


def find_resume_tag(path: str) -> Optional[tuple[str, str]]:
    """(checkpoint dir, tag) of the newest complete checkpoint under `path`, which may be the
    checkpoint directory or one tag inside it; None if there is none."""
    path = os.path.normpath(path)
    if TAG.match(os.path.basename(path)):
        ok = os.path.isfile(os.path.join(path, MARKER))
        return (os.path.dirname(path), os.path.basename(path)) if ok else None
    tags = complete_tags(path)
    return (path, tags[-1]) if tags else None


# -- RNG states as plain data (every rank's, in client_state) ----------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(saved: dict) -> None:
    random.setstate(_as_tuples(saved["python"]))
    name, keys, *rest = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def _as_tuples(obj):
    return tuple(_as_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _gather_objects(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- save / resume ------------------------------------------------------------------------------
def save(engine, ckpt_dir: str, step: int, data_state: Optional[dict], keep: int, extra: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    per_rank = _gather_objects({"data": data_state, "rng": rng_state()})
    client = {"step": step, "data_states": [r["data"] for r in per_rank], "rng_states": [r["rng"] for r in per_rank],
              **(extra or {})}
    layout = current_layout(engine)  # read by a resume before DeepSpeed touches the files
    names = optimizer_param_names(engine)
    if names is not None:
        client[PARAM_NAMES] = names
    if _rank() == 0:  # a leftover of an interrupted save of the same step must not be mistaken for this one
        stale = os.path.join(ckpt_dir, tag)
        if os.path.isdir(stale) and not os.path.isfile(os.path.join(stale, MARKER)):
            shutil.rmtree(stale)
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)  # ends in a barrier
    if _rank() == 0:
        _write_atomic(os.path.join(ckpt_dir, tag, MARKER), json.dumps({"step": step, "layout": layout}))
        _write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep)
    _barrier()
    return tag


def optimizer_param_names(engine) -> Optional[list[list[str]]]:
    """Per optimizer group, its parameters' names, for a ZeRO-0 checkpoint, whose optimizer state
    numbers the tensors without naming them (ZeRO-1/2/3 store DeepSpeed's param_shapes instead)."""
    if engine.zero_optimization_stage() != 0 or engine.optimizer is None:
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    optimizer = engine.optimizer  # DeepSpeed's bf16/fp16 wrappers keep the model's tensors in *_groups
    groups = (getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bf16_groups", None)
              or [g["params"] for g in optimizer.param_groups])
    found = [[names.get(id(p)) for p in group] for group in groups]
    return None if any(n is None for group in found for n in group) else found


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and every incomplete one."""
    complete = complete_tags(ckpt_dir)
    doomed = set(complete[:-keep]) | {t for t in os.listdir(ckpt_dir) if TAG.match(t) and t not in complete}
    for tag in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def resume(engine, path: str) -> Optional[dict]:
    """Load the newest usable complete checkpoint under `path` (a checkpoint dir, one tag, or a
    `to-portable` folder) into the engine and restore this rank's RNG states.

    Returns None when there is nothing to resume, else {"step", "data_state" (this rank's, merged
    over all saved ranks when the DP size changed), "data_states", "tag", "skipped": [(tag, reason)]
    of newer complete checkpoints that could not be loaded, "notes": other lines for the console
    (a changed DP size, a portable source)}.
    Files are read weights-only (a file holding code is refused, never fallen back from); a layout
    DeepSpeed cannot load across is one UserError naming the `to-portable` route."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return _resume_portable(engine, path)
    candidates = _candidates(path)
    if not candidates:
        return None
    safe_engine.install(engine)
    skipped = []
    for ckpt_dir, tag in candidates:
        saved = refuse_layout_change(ckpt_dir, tag, engine)  # the same for every tag: no fallback
        reason = tag_problem(os.path.join(ckpt_dir, tag))
        client = None
        if reason is None:
            reason, client = _load(engine, ckpt_dir, tag)
        if reason is None:
            break
        skipped.append((tag, reason))
    else:
        raise CheckpointError(f"resume: no usable complete checkpoint in {candidates[0][0]}: "
                              + "; ".join(f"{t}: {r}" for t, r in skipped))
    _reapply_scheduled_lr(engine)
    rank, saved_ranks = _rank(), len(client["rng_states"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    notes = []
    if saved_ranks == world:
        set_rng_state(client["rng_states"][rank])
        data_state = client["data_states"][rank]
    else:  # a ZeRO-0 checkpoint on another DP size: the loader re-deals the epoch's unread shards
        from vlmo_large.data.loader import merge_loader_states
        data_state = merge_loader_states(client["data_states"])
        notes.append(f"resume: {tag} was saved by {saved_ranks} ranks ({describe(saved)}), this run has {world}; "
                     "weights and optimizer state restored, the data position at shard granularity, RNG states not")
    return {"step": client["step"], "data_state": data_state, "data_states": client["data_states"], "tag": tag,
            "skipped": skipped, "notes": notes}


def _candidates(path: str) -> list[tuple[str, str]]:
    """(checkpoint dir, tag) to try, newest first: one given tag, or every complete one."""
    path = os.path.normpath(path)
    if TAG.match(os.path.basename(path)):
        found = find_resume_tag(path)
        return [found] if found else []
    return [(path, tag) for tag in reversed(complete_tags(path))]


def _load(engine, ckpt_dir: str, tag: str) -> tuple[Optional[str], Optional[dict]]:
    """engine.load_checkpoint; -> (None, client_state), or (why it failed on some rank, None).
    Every rank learns every rank's outcome, so all of them fall back together."""
    reason, client = None, None
    try:
        loaded, client = engine.load_checkpoint(ckpt_dir, tag=tag)
        if loaded is None:
            reason = "DeepSpeed found nothing to load"
    except safe_engine.UnsafeCheckpointError:
        raise
    except Exception as exc:  # a file DeepSpeed reads is corrupt in a way the cheap checks missed
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    reasons = [r for r in _gather_objects(reason) if r is not None]
    return (reasons[0], None) if reasons else (None, client)


def _resume_portable(engine, path: str) -> dict:
    """A `to-portable` folder: weights and Adam moments set on this run's layout."""
    from vlmo_large.checkpoint.portable import load_portable
    from vlmo_large.data.loader import merge_loader_states

    if current_layout(engine)["pp"] > 1:
        raise UserError(f"resume: {path} is a portable checkpoint; resuming a pipeline (parallel.pp > 1) run from "
                        "one is not supported")
    training = load_portable(engine, path)
    client = training.get("client_state") or {}
    if "step" not in client or not client.get("data_states"):
        raise CheckpointError(f"{os.path.join(path, STATE_FILE)}: no trainer state (step, data_states); resume "
                              "needs a portable copy of a checkpoint the trainer wrote")
    _reapply_scheduled_lr(engine)
    return {"step": client["step"], "data_state": merge_loader_states(client["data_states"]),
            "data_states": client["data_states"], "tag": path, "skipped": [],
            "notes": [f"resume: from the portable checkpoint {path} ({training.get('source')}): weights and Adam "
                      "moments on this layout, the data position at shard granularity, RNG states not restored"]}


def _reapply_scheduled_lr(engine) -> None:
    """DeepSpeed restores the scheduler's position (last_epoch) but ZeRO keeps the new engine's
    step-0 lr in the optimizer, so the first resumed step would use the wrong lr. Recompute it
    from the position and this run's schedule (the schedule is a plain function, so LambdaLR never
    saves it: a resumed run may extend schedule.steps)."""
    scheduler = engine.lr_scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs


# -- plain weights --------------------------------------------------------------------------------
def export_weights(engine, model, out_dir: str, zero3: bool, extras: Optional[ExportExtras] = None) -> Optional[str]:
    """Collective: full (TP-merged, ZeRO-3-gathered) weights of `model` as model.safetensors plus
    config.json and `extras` (checkpoint.plain.write_export), written by rank 0. Tensors keep the
    training dtype."""
    import deepspeed

    params = list(model.parameters())
    gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext()
    with gathered:
        full = gather_full_state_dict(model, state.tp_group())
    path = write_export(out_dir, full, model.cfg, extras) if _rank() == 0 else None
    _barrier()
    return path
