"""Training throughput with the launcher's thread choice against other per-rank thread counts.

    python benchmarks/thread_bench.py [--ranks 2] [--steps 40] [--rounds 2] [--variants auto,4]

Runs the real launcher (tiny, stage vl, random data, DeepSpeed's own launcher when --ranks > 1,
which sets LOCAL_SIZE but no OMP_NUM_THREADS) once per variant and round, variants alternating
within each round so that a machine whose load changes favours none. "auto" is the launcher's
own choice (no OMP_NUM_THREADS, no --threads: the usable cores / ranks on the host); a number N
is `--threads N`. Before this choice existed, every rank under DeepSpeed's launcher took every core
of the host (`--threads <cores>` reproduces it). `--busy K` starts K spinning processes for the
duration (a machine busy with other jobs, where a smaller --threads pays). Prints the median samples/s of the logged steps
after the first five, per variant and round, and each variant's median relative to the first.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(variant: str, ranks: int, steps: int, out: str) -> tuple[float, str]:
    args = [os.path.join(REPO, "launchers", "pretrain.py"), "--ds_config",
            os.path.join(REPO, "ds_configs", "cpu_fp32.json"), "preset=tiny", "stage=vl", "data.source=random",
            "batch.micro=8", f"schedule.steps={steps}", "schedule.warmup=1", "log_every=1", "checkpoint.every=0",
            "checkpoint.export=false", "tracking_uri=none", f"output_dir={out}"]
    args += [] if variant == "auto" else ["--threads", variant]
    cmd = ([shutil.which("deepspeed"), "--num_gpus", str(ranks), "--master_port", "29733"] if ranks > 1
           else [sys.executable]) + args
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{variant}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    rates = [float(m) for m in re.findall(r"^step \d+/\d+ .* samples/s=([\d.]+)", done.stdout, re.M)][5:]
    chosen = re.search(r"threads: (.*)", done.stdout)
    return statistics.median(rates), chosen.group(1) if chosen else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=f"auto,{len(os.sched_getaffinity(0))}")
    p.add_argument("--busy", type=int, default=0, help="spinning processes to run alongside")
    a = p.parse_args()
    variants = a.variants.split(",")
    results: dict[str, list[float]] = {v: [] for v in variants}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    try:
        run_all(a, variants, results)
    finally:
        for s in spinners:
            s.kill()
    base = statistics.median(results[variants[0]])
    for v in variants:
        med = statistics.median(results[v])
        print(f"{v:>5}: median {med:7.2f} samples/s  x{med / base:.2f} of {variants[0]}")


def run_all(a, variants: list[str], results: dict[str, list[float]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                rate, chosen = one_run(v, a.ranks, a.steps, os.path.join(tmp, f"{v}-{r}"))
                results[v].append(rate)
                print(f"round {r} {v:>5}: {rate:7.2f} samples/s   ({chosen})", flush=True)


if __name__ == "__main__":
    main()
