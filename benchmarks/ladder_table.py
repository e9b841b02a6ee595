"""Markdown for benchmarks/RESULTS.md from step_bench's JSON lines (gpu_ladder.py writes them).

    python benchmarks/ladder_table.py rows.jsonl

One table of the step timings (a row per configuration and micro-batch; OOM, timeouts and skipped
rows included, so the table says what did not run), the profile breakdown of each profiled row,
and the host-sync check.
"""
from __future__ import annotations

import json
import sys
import time

COLUMNS = ("preset", "micro", "ZeRO", "attention", "compiled", "s/step", "samples/s", "TFLOP/s", "MFU",
           "peak GiB", "first step s")


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def compiled(r: dict) -> str:
    """The compiled column: yes/no, the torch.compile mode when not the default, packed unimodal passes."""
    text = "yes" if r.get("compile") else "no"
    if r.get("compile") and r.get("compile_mode") not in (None, "default"):
        text += f" ({r['compile_mode']})"
    return text + (", packed unimodal" if r.get("pack_unimodal") else "")


def table_row(r: dict) -> str:
    config = [r.get("preset", ""), str(r.get("batch", "")), str(r.get("zero", "")), r.get("attention", ""),
              compiled(r)]
    if r.get("status") != "ok":
        status = r.get("status", "?")
        note = f" ({r['error']})" if r.get("error") and status != "OOM" else ""
        return "| " + " | ".join(config + [f"**{status}**{note}"] + [""] * (len(COLUMNS) - len(config) - 1)) + " |"
    mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    values = [_num(r.get("s_step"), ".3f"), _num(r.get("samples_s"), ".1f"), _num(r.get("tflops"), ".1f"), mfu,
              _num(r.get("peak_mem_gib"), ".1f"), _num(r.get("first_step_s"), ".1f")]
    return "| " + " | ".join(config + values) + " |"


def profile_table(r: dict) -> list[str]:
    b = r["profile"]
    step = b["step_ms"] or 1e-9
    name = (f"{r['preset']} micro {r['batch']} ZeRO-{r['zero']} {r['attention']}"
            f"{' compiled' if r.get('compile') else ''}"
            f"{' ' + r['compile_mode'] if r.get('compile') and r.get('compile_mode') not in (None, 'default') else ''}"
            f"{' packed unimodal' if r.get('pack_unimodal') else ''}")
    rows = list(b["categories_ms"].items())
    if b["kind"] == "gpu":
        rows.append(("idle gaps (compute stream)", b["idle_gaps_ms"]))
        head = (f"Profile of one step, {name}: {b['step_ms']:.1f} ms wall, {b['kernels']} kernel launches, "
                f"{b['host_syncs']} host syncs ({b['host_sync_ms']:.1f} ms)")
    else:
        rows.append(("outside ops (Python)", b["outside_ops_ms"]))
        head = (f"Profile of one step, {name}: {b['step_ms']:.1f} ms wall, {b['aten_ops']} aten ops "
                f"({b['aten_leaf_ops']} doing the work)")
    lines = ["", head + ":", "", "| where | ms | % of the step |", "|---|---|---|"]
    lines += [f"| {k} | {ms:.1f} | {100 * ms / step:.1f}% |" for k, ms in rows]
    return lines


def sync_lines(r: dict) -> list[str]:
    s = r["sync_check"]
    lines = ["", f"Host syncs in one step ({r['preset']} micro {r['batch']} ZeRO-{r['zero']}, "
                 f"`torch.cuda.set_sync_debug_mode`): **{s['syncs']}**"
             + (f"; one step under \"error\": {s['error_mode']}" if "error_mode" in s else "")]
    lines += [f"- {x['phase']}: {x['count']} x `{x['where']}`" for x in s["sites"][:20]]
    return lines


def markdown(rows: list[dict]) -> str:
    known = [r for r in rows if r.get("device")]
    card = known[0]["device"] if known else "unknown device"
    versions = (f"torch {known[0].get('torch')}, deepspeed {known[0].get('deepspeed')}" if known else "")
    dtype = known[0].get("dtype", "") if known else ""
    lines = [f"## {card} — {time.strftime('%Y-%m-%d', time.gmtime())}", "",
             f"{versions}, one device (`bash benchmarks/gpu_check.sh`), {dtype}, random tensors, the trainer's "
             "step (`benchmarks/step_bench.py`); MFU from training/step_flops.py.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [table_row(r) for r in rows]
    for r in rows:
        if r.get("profile"):
            lines += profile_table(r)
        if r.get("sync_check"):
            lines += sync_lines(r)
    return "\n".join(lines)


def read_rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    print(markdown(read_rows(sys.argv[1])))
