"""What `--resume` checks in a DeepSpeed checkpoint tag before DeepSpeed reads it.

- `tag_problem`: a reason the tag cannot be loaded (a file DeepSpeed will read is missing, empty
  or truncated) or None. Cheap: names, sizes and each .pt file's zip directory, no tensor data.
- `saved_layout` / `layout_change`: the TP / PP / DP / ZeRO layout that wrote the tag (from its
  COMPLETE marker, else from its file names) against this run's. DeepSpeed restores ZeRO-1/2/3
  partitions only at the DP size that wrote them, and any checkpoint only at its TP and PP sizes;
  a ZeRO-0 checkpoint (every rank holds everything) loads at any DP size.
"""
from __future__ import annotations

import json
import os
import re
import zipfile

from vlmo_large.checkpoint.deepspeed_reader import _LAYER, _OPTIM
from vlmo_large.errors import UserError

_MODEL_ANY = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
LAYOUT_KEYS = ("tp", "pp", "dp", "zero")


def current_layout(engine) -> dict:
    from megatron.core import parallel_state

    from vlmo_large.parallel import state
    return {"tp": state.tp_size(), "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": state.dp_size(), "zero": int(engine.zero_optimization_stage())}


def saved_layout(tag_dir: str) -> dict:
    """{"tp", "pp", "dp", "zero"} of the run that wrote `tag_dir`; a value is None where the file
    names do not tell (the DP size of a ZeRO-0 tag, ZeRO-1 vs 2) and no marker recorded it."""
    try:
        with open(os.path.join(tag_dir, "COMPLETE")) as f:
            marked = json.load(f).get("layout")
        if isinstance(marked, dict) and set(LAYOUT_KEYS) <= set(marked):
            return {k: marked[k] for k in LAYOUT_KEYS}
    except (OSError, ValueError, AttributeError):
        pass
    files = os.listdir(tag_dir)
    model = [m for f in files if (m := _MODEL_ANY.match(f))]
    optim = [m for f in files if (m := _OPTIM.match(f))]
    layers = [m for f in files if (m := _LAYER.match(f))]
    mp_ranks = {int(m.group(2)) for m in model}
    if layers:
        tp = 1 + max(int(m.group(2)) for m in layers)
        return {"tp": tp, "pp": max(1, len(mp_ranks) // tp), "zero": 1 if optim else 0,
                "dp": len({m.group(1) for m in optim}) if optim else None}
    zero3 = any(m.group(1) is not None for m in model)
    dp = (len({m.group(1) for m in model}) if zero3 else len({m.group(1) for m in optim}) if optim else None)
    return {"tp": len(mp_ranks), "pp": 1, "dp": dp, "zero": 3 if zero3 else None if optim else 0}


def layout_change(saved: dict, now: dict) -> list[str]:
    """The differences DeepSpeed cannot load across (empty when it can)."""
    changed = [k for k in ("tp", "pp") if saved[k] != now[k]]
    if saved["zero"] is None:  # ZeRO-1 or 2 (the same files)
        changed += ["zero"] if now["zero"] not in (1, 2) else []
    elif saved["zero"] != now["zero"]:
        changed.append("zero")
    if now["zero"] > 0 and saved["dp"] is not None and saved["dp"] != now["dp"]:
        changed.append("dp")
    return changed


def describe(layout: dict) -> str:
    zero = "ZeRO-1/2" if layout["zero"] is None else f"ZeRO-{layout['zero']}"
    dp = "?" if layout["dp"] is None else layout["dp"]
    return f"TP={layout['tp']} PP={layout['pp']} DP={dp} {zero}"


def refuse_layout_change(ckpt_dir: str, tag: str, engine) -> dict:
    """Raise UserError when this run cannot load the tag as DeepSpeed wrote it; -> the saved layout."""
    saved, now = saved_layout(os.path.join(ckpt_dir, tag)), current_layout(engine)
    if layout_change(saved, now):
        raise UserError(f"resume: the layout changed: {os.path.join(ckpt_dir, tag)} was saved with "
                        f"{describe(saved)}, this run is {describe(now)}, and DeepSpeed cannot load across that; "
                        f"convert it with `python tools/convert_checkpoint.py to-portable {ckpt_dir} PORTABLE "
                        f"--tag {tag}` and resume from PORTABLE (`--resume PORTABLE`, TP/DP/ZeRO changes; not PP)")
    return saved


def tag_problem(tag_dir: str) -> str | None:
    """Why DeepSpeed could not load this tag (missing, empty or truncated files), or None."""
    files = sorted(f for f in os.listdir(tag_dir) if f.endswith(".pt"))
    saved = saved_layout(tag_dir)  # from the marker, or from the files that are there
    want = {f"mp_rank_{r:02d}_model_states.pt" for r in range(saved["tp"] * saved["pp"])}
    if saved["zero"] == 3:
        want = {f"zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt" for r in range(saved["tp"])
                for d in range(saved["dp"] or 1)}
    if saved["zero"] != 0 and saved["dp"]:  # ZeRO-1/2/3: every DP rank's optimizer partition
        for mp in range(saved["tp"] * saved["pp"]):
            for dp in range(saved["dp"]):
                name = f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
                want.add(f"bf16_{name}" if f"bf16_{name}" in files else name)
    missing = sorted(want - set(files))
    if missing:
        return f"missing file {missing[0]}"
    if not any(_MODEL_ANY.match(f) for f in files):
        return "no *_model_states.pt file"
    for name in files:
        path = os.path.join(tag_dir, name)
        if os.path.getsize(path) == 0:
            return f"empty file {name}"
        try:
            with zipfile.ZipFile(path) as archive:  # the directory at the end: gone when truncated
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"unreadable file {name} (truncated?): {exc}"
    return None
