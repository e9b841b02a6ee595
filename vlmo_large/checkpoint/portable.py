"""A training checkpoint without a layout, to resume on another TP / DP / ZeRO layout.

`save_portable` reads a DeepSpeed checkpoint offline and writes, per parameter and at full
(TP-gathered, DP-gathered) shape, the fp32 master weights and Adam's two moments as three plain
folders, plus `training_state.json` (optimizer step, engine counters, JSON-able client state).
`load_portable`, called by a run after `deepspeed.initialize` on any layout, cuts each tensor for
its TP rank (the placement megatron declared on the parameter) and hands it to DeepSpeed's
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, which keep the DP partition they own.
"""
from __future__ import annotations

import json
import os

import torch

from vlmo_large.checkpoint.convert import full_tensor, open_deepspeed
from vlmo_large.checkpoint.layout import check_shape, strip_prefix
from vlmo_large.checkpoint.plain import PlainCheckpoint, write_plain
from vlmo_large.formats.io import CheckpointError
from vlmo_large.model.tensor_parallel import placement, shard

PARTS = {"weights": "fp32", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
STATE_FILE = "training_state.json"


def save_portable(ckpt_path: str, out_dir: str, preset: str | None = None, config_path: str | None = None,
                  tag: str | None = None, max_shard_bytes: int = 5 * 10 ** 9) -> None:
    ckpt, cfg, layout, to_ds = open_deepspeed(ckpt_path, preset, config_path, tag)
    entries = [(name, info.shape, torch.float32) for name, info in layout.items()]
    for folder, key in PARTS.items():
        write_plain(os.path.join(out_dir, folder), entries,
                    lambda name, key=key: full_tensor(ckpt, layout, to_ds, name, key).contiguous(),
                    cfg, max_shard_bytes=max_shard_bytes, desc=f"to-portable {folder}")
    states = ckpt.states
    training = {"optimizer_step": ckpt.step(), "source": ckpt.describe(),
                **{k: states.get(k) for k in ("global_steps", "global_samples", "skipped_steps")},
                "lr_scheduler": _json_or_none(states.get("lr_scheduler")),
                "client_state": {k: v for k, v in ckpt.client_state.items() if _json_or_none(v) is not None}}
    with open(os.path.join(out_dir, STATE_FILE), "w") as f:
        json.dump(training, f, indent=2)


def _json_or_none(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def load_portable(engine, path: str) -> dict:
    """Set weights, Adam moments and step counters of a DeepSpeed `engine` (any layout) from `path`.

    Returns training_state.json's contents (global_steps, client_state, ...) for the trainer.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from vlmo_large.parallel import state

    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            training = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {os.path.join(path, STATE_FILE)}: {exc}") from exc
    parts = {folder: PlainCheckpoint(os.path.join(path, folder)) for folder in PARTS}
    rank, world = state.tp_rank(), state.tp_size()
    named = list(engine.module.named_parameters())
    to_ours = strip_prefix([n for n, _ in named], set(parts["weights"].names()), path)
    zero = hasattr(engine.optimizer, "optimizer")  # ZeRO / bf16 optimizers wrap a torch optimizer
    _ensure_adam_state(engine.optimizer)
    with torch.no_grad():
        for name, param in named:
            ours, place = to_ours[name], placement(param)
            want = tuple(getattr(param, "ds_shape", param.shape))

            def local(part: str) -> torch.Tensor:
                full = parts[part].get(ours)
                value = full if place is None else shard(full, *place, rank, world)
                check_shape(ours, value.shape, want, parts[part].file_of(ours))
                return value

            if hasattr(param, "ds_id"):
                for part, key in PARTS.items():
                    _set_zero3_partition(engine.optimizer, param, local(part), None if key == "fp32" else key)
            elif zero:
                safe_set_full_fp32_param(param, local("weights"))
                for part, key in PARTS.items():
                    if key != "fp32":
                        safe_set_full_optimizer_state(param, local(part), key)
            else:
                param.copy_(local("weights"))
                slot = engine.optimizer.state[param]
                slot.update({key: local(part).clone() for part, key in PARTS.items() if key != "fp32"})
    _refresh_low_precision(engine.optimizer)
    _set_step(engine, training)
    return training


def _set_zero3_partition(optimizer, param, value: torch.Tensor, key: str | None) -> None:
    """This DP rank's slice of `value` into ZeRO-3's fp32 partition (or Adam state `key`).

    DeepSpeed's own set_full_hp_param (0.19.8) reads past the end of a parameter whose size does
    not divide by the DP size (the last rank's slice is partly padding), so the slice is cut here.
    """
    target, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    flat = value.reshape(-1)
    start = optimizer._get_param_partition_rank(param) * target.numel()
    piece = flat[start:start + target.numel()]
    target.zero_()
    target[:piece.numel()].copy_(piece)


def _ensure_adam_state(optimizer) -> None:
    """torch's Adam creates its moments at the first step; create them now so they can be set.

    ZeRO-3 puts its flat fp32 partitions into the torch optimizer's groups only while stepping,
    so those are listed explicitly."""
    base = getattr(optimizer, "optimizer", optimizer)
    amsgrad = any(group.get("amsgrad") for group in base.param_groups)
    flats = [p for group in base.param_groups for p in group["params"]]
    flats += list(getattr(optimizer, "fp32_partitioned_groups_flat", []))
    for param in flats:
        slot = base.state[param]
        if not slot:
            slot["step"] = torch.tensor(0.0)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                slot[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link the new state
        optimizer._lazy_init_hp_params_optimizer_state()


def _refresh_low_precision(optimizer) -> None:
    """Copy the fp32 masters just set into the parameters the model computes with."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for group in range(len(optimizer.fp16_groups)):
            optimizer._reassign_or_swap_out_partitioned_parameters(group)
    elif hasattr(optimizer, "update_lp_params"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
        optimizer.update_lp_params()


def _set_step(engine, training: dict) -> None:
    step = training.get("optimizer_step")
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if step is not None:
        for slot in list(base.state.values()):
            if "step" in slot:
                slot["step"] = torch.tensor(float(step)) if torch.is_tensor(slot["step"]) else step
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if training.get(key) is not None:
            setattr(engine, key, training[key])
    scheduler = training.get("lr_scheduler")
    if scheduler and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(scheduler)
