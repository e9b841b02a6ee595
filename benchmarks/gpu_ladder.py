"""The GPU ladder of step_bench runs within a time budget, then the table for RESULTS.md.

    python benchmarks/gpu_ladder.py --out DIR [--budget 400] [--dry-run]

Rows run in order of importance, each as its own process with its own timeout; a row whose
minimum time no longer fits the budget is reported as skipped, so the most important rows
always finish and the whole ladder never runs past the budget. A list of micro-batches runs in
one engine, smallest first, and stops at the first OOM (step_bench). Writes DIR/rows.jsonl,
DIR/ladder.log, DIR/profile/ (chrome traces) and DIR/table.md, and prints the table.

--dry-run: the same rows on this machine's CPU with the tiny preset, fp32, one step each, the
compiled rows eager (a CPU compile of every shape takes minutes): proves the plumbing here.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER_FILE = os.path.join(os.path.dirname(HERE), "ds_configs", "large_16gpu_zero2_bf16.json")

# (what it measures, step_bench arguments, timeout s, minimum s worth starting). Compile of large
# takes ~1-2 min per shape set on an H100; eager large processes ~30-60 s. Compiled rows run
# ZeRO-2, the cluster recipe: ZeRO-3's hooks stop a whole-graph compile (launchers/CLUSTER.md).
ROWS = (
    ("large ZeRO-2 compiled (the target) + profile",
     ["--preset", "large", "--batch", "32", "--zero", "2", "--compile", "--profile", "{out}/profile"], 240, 150),
    ("large ZeRO-2 eager, micro 16/32/64",
     ["--preset", "large", "--batch", "16,32,64", "--zero", "2"], 120, 60),
    ("base ZeRO-2 eager, micro 16/32/64 + host-sync check",
     ["--preset", "base", "--batch", "16,32,64", "--zero", "2", "--sync-check"], 100, 45),
    ("base ZeRO-2 compiled",
     ["--preset", "base", "--batch", "64", "--zero", "2", "--compile"], 150, 90),
    ("large ZeRO-3 eager (the previous recipe)", ["--preset", "large", "--batch", "32", "--zero", "3"], 90, 45),
    ("large ZeRO-1 eager", ["--preset", "large", "--batch", "32", "--zero", "1"], 90, 45),
    ("base ZeRO-3 eager", ["--preset", "base", "--batch", "64", "--zero", "3"], 60, 35),
    ("large ZeRO-2 compiled, SDPA instead of flex",
     ["--preset", "large", "--batch", "32", "--zero", "2", "--compile", "--attention", "sdpa"], 200, 150),
    # last: the budget reaches them only when the rows above finish early
    ("large ZeRO-2 compiled + CUDA graphs (reduce-overhead)",
     ["--preset", "large", "--batch", "32", "--zero", "2", "--compile", "--compile-mode", "reduce-overhead"],
     240, 150),
    ("large ZeRO-2 compiled, packed unimodal passes",
     ["--preset", "large", "--batch", "32", "--zero", "2", "--compile", "--pack-unimodal"], 200, 150),
)


def row_args(args: list[str], out: str, dry_run: bool) -> list[str]:
    """step_bench arguments of a row on this machine."""
    args = [a.replace("{out}", out) for a in args]
    common = ["--ds-config", CLUSTER_FILE]  # the cluster recipe's buckets and communication dtype
    if not dry_run:
        return args + common + ["--dtype", "bf16", "--steps", "5", "--warmup", "2"]
    if "--compile" in args:  # a CPU compile of every shape takes minutes: the row runs eager
        args.remove("--compile")
        if "--compile-mode" in args:  # step_bench refuses a mode without --compile
            del args[args.index("--compile-mode"):args.index("--compile-mode") + 2]
    args[args.index("--preset") + 1] = "tiny"
    batches = args[args.index("--batch") + 1].split(",")
    args[args.index("--batch") + 1] = ",".join(str(2 * (i + 1)) for i in range(min(2, len(batches))))
    return args + common + ["--dtype", "fp32", "--steps", "1", "--warmup", "1"]


def config_of(args: list[str]) -> dict:
    """The row's identity for a table line when step_bench wrote none (timeout, crash, skipped)."""
    def value(flag, default=None):
        return args[args.index(flag) + 1] if flag in args else default
    return {"preset": value("--preset"), "batch": value("--batch"), "zero": value("--zero"),
            "attention": value("--attention", "auto"), "compile": "--compile" in args,
            "compile_mode": value("--compile-mode", "default") if "--compile" in args else None,
            "pack_unimodal": "--pack-unimodal" in args, "dtype": value("--dtype")}


def run_row(cmd: list[str], timeout: float, log) -> tuple[str, str]:
    """Run one step_bench process; (status, last output line). Kills its process group on timeout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = ""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    else:
        status = "ok" if proc.returncode == 0 else f"error (exit {proc.returncode})"
    lines = [line for line in (out or "").splitlines() if line.strip()]
    keep = [line for line in lines if not _noise(line)]
    log.write("\n".join(keep) + "\n")
    log.flush()
    print("\n".join(line for line in keep if line.startswith(("step_bench", "profile", "sync", "  ", "Traceback"))
                    or "Error" in line), flush=True)
    if lines:
        last = next((line for line in reversed(lines) if "Error" in line), lines[-1])
    return status, last.strip()[:300]


def _noise(line: str) -> bool:
    return any(s in line for s in ("warnings.warn(", "UserWarning", "FutureWarning", "USDT:", "[WARNING]"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all rows together")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.jsonl")
    open(rows_path, "w").close()
    end = time.monotonic() + args.budget
    with open(os.path.join(args.out, "ladder.log"), "a") as log:
        for title, spec, timeout, minimum in ROWS:
            bench = row_args(spec, args.out, args.dry_run)
            left = end - time.monotonic()
            if left < (minimum if not args.dry_run else 0):
                why = f"budget: {left:.0f} s left"
                _append(rows_path, {**config_of(bench), "status": "skipped", "error": why})
                print(f"== {title}: skipped ({why})", flush=True)
                continue
            limit = 600 if args.dry_run else min(timeout, left)  # a loaded CPU: no tight limits
            print(f"== {title} (timeout {limit:.0f} s, {left:.0f} s of the budget left)", flush=True)
            before = _count(rows_path)
            cmd = [sys.executable, os.path.join(HERE, "step_bench.py"), *bench, "--json", rows_path]
            status, last = run_row(cmd, limit, log)
            if _count(rows_path) == before or status != "ok":
                if _count(rows_path) == before:
                    _append(rows_path, {**config_of(bench), "status": status, "error": last})
                else:  # some micro-batches finished before the process died
                    _append(rows_path, {**config_of(bench), "status": status, "error": last, "batch": "next"})
    sys.path.insert(0, HERE)
    from ladder_table import markdown, read_rows

    table = markdown(read_rows(rows_path))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)
    return 0


def _count(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
