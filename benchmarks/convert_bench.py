"""Conversion time and peak RAM: `to_plain` next to DeepSpeed's own zero_to_fp32, one checkpoint.

Makes a 2-rank ZeRO-3 checkpoint of the `base` preset (no training steps; Adam state created, so
the optimizer files have their real size), then converts it to safetensors with each tool in a
fresh process and reports wall time, peak RSS (VmHWM: includes mmap'd file pages the kernel may
drop) and peak anonymous memory (RssAnon, sampled: what the process itself allocated).

    python benchmarks/convert_bench.py [--preset base] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)


def make_checkpoint(out: str, preset: str) -> None:
    """Run under torchrun: ZeRO-3 over all ranks, save with optimizer state, no steps."""
    import importlib

    import deepspeed
    import torch

    from tests.checkpoint.ds_train import allow_0dim_params, ds_config
    from vlmo_large.checkpoint.portable import _ensure_adam_state
    from vlmo_large.model import build_model
    from vlmo_large.parallel import state

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    allow_0dim_params()
    state.ensure_initialized()
    torch.manual_seed(0)
    model = build_model(preset)
    config = ds_config(zero=3, bf16=False, micro=1)
    config["train_batch_size"] = state.dp_size()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      mpu=state.DeepSpeedMPU())
    _ensure_adam_state(engine.optimizer)
    engine.save_checkpoint(out, tag="step0", client_state={"model_config": vars(model.cfg)})
    state.destroy()


def measure(tool: str, ckpt: str, out: str) -> None:
    """Run one conversion in this process; print a JSON line with time and memory."""
    import threading

    peak = {"anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    if tool == "to_plain":
        from vlmo_large.checkpoint import to_plain
        to_plain(ckpt, out)
    else:
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
        convert_zero_checkpoint_to_fp32_state_dict(ckpt, out, safe_serialization=True)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    print(json.dumps({"tool": tool, "seconds": seconds, "peak_rss_mb": _status_kb("VmHWM") / 1024,
                      "peak_anon_mb": peak["anon"] / 1024}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--make", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        return make_checkpoint(args.make, args.preset)
    if args.measure:
        return measure(*args.measure)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    work = args.workdir or tempfile.mkdtemp(prefix="convert_bench_")
    ckpt = os.path.join(work, "ckpt")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    __file__, "--preset", args.preset, "--make", ckpt], env=env, check=True, timeout=1800,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"made a 2-rank ZeRO-3 '{args.preset}' checkpoint ({_folder_mb(ckpt):.0f} MB) in "
          f"{time.perf_counter() - start:.0f} s")
    rows = []
    for tool in ("to_plain", "zero_to_fp32"):
        out = os.path.join(work, tool)
        result = subprocess.run([sys.executable, __file__, "--measure", tool, ckpt, out], env=env, check=True,
                                capture_output=True, text=True, timeout=1800)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["output_mb"] = _folder_mb(out)
        rows.append(row)
    print(f"{'tool':<14}{'seconds':>9}{'peak RSS MB':>13}{'peak anon MB':>14}{'output MB':>11}")
    for row in rows:
        print(f"{row['tool']:<14}{row['seconds']:>9.1f}{row['peak_rss_mb']:>13.0f}{row['peak_anon_mb']:>14.0f}"
              f"{row['output_mb']:>11.0f}")
    if not args.keep and not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
