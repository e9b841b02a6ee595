"""Time the training step a user runs (stage 3: every pass, backward, optimizer) on this device.

    python benchmarks/step_bench.py --preset base --batch 4 [--steps 3 --warmup 1 --dtype fp32 --zero 0]
    python benchmarks/step_bench.py --preset large --batch 16,32,64 --dtype bf16 --zero 3 --compile \\
        --attention flex --profile /tmp/prof --json results.jsonl
    python benchmarks/step_bench.py --preset base --batch 32 --shards 'data/train-{000000..000009}.tar' \\
        --tokenizer data/tokenizer.model --workers 6

The step is the trainer's own (training/trainer.py: Trainer.setup builds the model, the
objective, the DeepSpeed engine and the data, as launchers/pretrain.py does; train_step runs
one optimizer step and reads the metrics back, which also waits for the device). One process,
ZeRO stage --zero (the cluster file's ZeRO/communication settings with --ds-config).

Data: random tensors with the pipeline's shapes (default; a few batches made up front, so data
costs nothing), or the real loader over --shards with --workers processes (what feeds the GPU).
--batch takes a list: each micro-batch size runs in the same engine, smallest first; the first
one that runs out of GPU memory is reported as OOM and ends the list.

Prints per micro-batch: s/step (median), samples/s, TFLOP/s and, on a known GPU, MFU (FLOPs and
peak from training/step_flops.py), peak GPU memory. --profile DIR: one more step under
torch.profiler, its chrome trace in DIR and where its time goes (profile_breakdown.py).
--sync-check (GPU): one step under torch.cuda.set_sync_debug_mode, listing every host sync by
phase. --json FILE appends one JSON line per micro-batch (benchmarks/ladder_table.py reads them).
On a CPU the process keeps freed host memory as the launcher does (--host-memory default shows
the cost of glibc's defaults).
"""
from __future__ import annotations

import argparse
import gc
import gzip
import itertools
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PHASES = ("to_device", "forward", "backward", "optimizer", "metrics")


def parse_args(argv=None) -> argparse.Namespace:
    from vlmo_large.config import COMPILE_MODES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--stage", default="vl", help="the task to time (a name registered in vlmo_large/tasks/)")
    parser.add_argument("--batch", default="4", help="micro-batch size, or a comma list run smallest first")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                        help="ZeRO stage (default: --ds-config's, else 0: nothing to partition)")
    parser.add_argument("--ds-config", help="a DeepSpeed file whose ZeRO and communication settings to use")
    parser.add_argument("--attention", choices=("auto", "sdpa", "explicit", "flex"), default="auto")
    parser.add_argument("--compile", action="store_true", help="model.compile=true (torch.compile per block)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="with --compile: model.compile_mode (reduce-overhead: CUDA graphs per block)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="activation checkpointing every k-th block")
    parser.add_argument("--pack-unimodal", action="store_true",
                        help="model.pack_unimodal=true (stage 3's image-only and text-only passes as one)")
    parser.add_argument("--shards", help="webdataset shards (brace pattern): the real loader instead of random tensors")
    parser.add_argument("--tokenizer", help="with --shards: the tokenizer file")
    parser.add_argument("--workers", type=int, default=4, help="with --shards: loader worker processes")
    parser.add_argument("--profile", metavar="DIR", help="profile one extra step: chrome trace + breakdown")
    parser.add_argument("--sync-check", action="store_true", help="GPU: list the host syncs of one step")
    parser.add_argument("--json", metavar="FILE", help="append one JSON line per micro-batch size")
    parser.add_argument("--host-memory", choices=("retain", "default"), default="retain",
                        help="retain: keep freed host memory, as launchers/pretrain.py does on a CPU")
    args = parser.parse_args(argv)
    try:
        args.batches = sorted({int(b) for b in args.batch.split(",")})
    except ValueError:
        parser.error(f"--batch {args.batch!r}: expected an integer or a comma list of integers")
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile")
    if args.shards and len(args.batches) > 1:
        parser.error("--shards takes one --batch size (the loader is built for it)")
    if args.shards and not args.tokenizer:
        parser.error("--shards needs --tokenizer")
    return args


def ds_config(args) -> dict:
    ds = {}
    if args.ds_config:
        try:
            with open(args.ds_config) as f:
                full = json.load(f)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--ds-config {args.ds_config}: {exc}") from exc
        ds = {k: full[k] for k in ("zero_optimization", "communication_data_type") if k in full}
    zero = ds.setdefault("zero_optimization", {})
    if args.zero is not None:
        zero["stage"] = args.zero
    zero.setdefault("stage", 0)
    ds["bf16"] = {"enabled": args.dtype == "bf16"}
    return ds


def run_config(args, micro: int):
    from vlmo_large.training.run_config import RunConfig, build_dataclass

    model = {"attention": args.attention, "checkpoint_every": args.checkpoint_every}
    if args.compile:
        model["compile"] = True
        model["compile_mode"] = args.compile_mode
    if args.pack_unimodal:
        model["pack_unimodal"] = True
    data = ({"source": "shards", "shards": args.shards, "tokenizer": args.tokenizer, "num_workers": args.workers}
            if args.shards else {"source": "random"})
    return build_dataclass(RunConfig, {"preset": args.preset, "stage": args.stage, "data": data, "model": model,
                                       "batch": {"micro": micro, "grad_accum": 1}, "tracking_uri": "none",
                                       "schedule": {"steps": 10 ** 6, "warmup": 10}, "log_every": 10 ** 6})


def build_trainer(args):
    """The trainer, set up as launchers/pretrain.py sets it up (one process)."""
    from vlmo_large.training.trainer import Trainer
    from vlmo_large.training.validation import resolve_run

    cfg = run_config(args, max(args.batches))
    trainer = Trainer(cfg, resolve_run(cfg, ds_config(args), 1))
    trainer.setup()
    compiled = [getattr(block.attn, "compiled", False) for block in trainer.model.backbone.blocks]
    if args.compile and not all(compiled):
        raise SystemExit("--compile: the trainer left blocks uncompiled (model.compile reaches "
                         "parallel/parallelize.py through Trainer.build_model)")
    return trainer


def batch_source(trainer, args, micro: int):
    """An endless iterator of host batches of `micro` samples."""
    import torch

    from vlmo_large.tasks.registry import get_task
    from vlmo_large.training.random_batches import RandomBatches
    from vlmo_large.training.trainer import endless

    if args.shards:
        return endless(trainer.loader)
    made = RandomBatches(get_task(trainer.cfg.stage).data_kind, trainer.resolved.model, micro, trainer.cfg.seed)
    batches = list(itertools.islice(iter(made), 2))  # two distinct batches, made before timing
    if torch.cuda.is_available():
        batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    return itertools.cycle(batches)


def flops_and_peak(trainer, micro: int, sample_batch: dict, dtype: str, device: str):
    """Useful FLOPs of one step and the device's dense peak TFLOP/s (None when unknown)."""
    from vlmo_large.training import step_flops

    flops = step_flops.step_flops(trainer.resolved.model, trainer.cfg.stage, sample_batch)
    return flops, step_flops.peak_tflops(device, dtype)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def timed_steps(trainer, batches, count: int) -> list[float]:
    import torch

    times = []
    for _ in range(count):
        start = time.perf_counter()
        trainer.train_step(batches)  # reads the metrics back: the step has finished on any device
        trainer.step += 1
        times.append(time.perf_counter() - start)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return times


def profile_step(trainer, batches, out_dir: str, tag: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from profile_breakdown import format_breakdown, summarize_trace

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        with record_function("ProfilerStep#0"):  # the window profile_breakdown measures
            trainer.train_step(batches)
    trainer.step += 1
    # a GPU step's trace runs to tens of MB: gzip (torch compresses a ".gz" path)
    path = os.path.join(out_dir, f"trace_{tag}.json" + (".gz" if torch.cuda.is_available() else ""))
    prof.export_chrome_trace(path)
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        breakdown = summarize_trace(json.load(f))
    print(f"profile {tag} -> {path}\n{format_breakdown(breakdown)}", flush=True)
    return breakdown


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sync_site(stack) -> str:
    """The innermost frame in this repository or DeepSpeed (else the innermost) as path:line."""
    def ours(path):
        path = os.path.abspath(path)
        in_repo = path.startswith(REPO + os.sep) and "site-packages" not in path
        return (in_repo and path != os.path.abspath(__file__)) or f"site-packages{os.sep}deepspeed{os.sep}" in path

    frames = [f for f in stack if not f.filename.endswith("warnings.py")]
    frame = ([f for f in frames if ours(f.filename)] or frames or stack)[-1]
    path = os.path.abspath(frame.filename)
    if path.startswith(REPO + os.sep):
        path = os.path.relpath(path, REPO)
    elif "site-packages" + os.sep in path:
        path = path.split("site-packages" + os.sep, 1)[1]
    return f"{path}:{frame.lineno} ({frame.name})"


def sync_check(trainer, batches) -> dict:
    """One step with torch.cuda.set_sync_debug_mode("warn"): every host sync counted by phase and
    source line. The step proper is to_device .. optimizer; "metrics" is the trainer's one read of
    the loss terms after it (reported apart). If the step proper had none, one more step under
    "error" (raises at any sync) confirms it."""
    import torch

    from vlmo_large.training.engine import model_dtype
    from vlmo_large.training.trainer import mean_over_data_parallel, to_device

    engine, dtype = trainer.engine, model_dtype(trainer.engine)

    def one_step(mode, sites: Counter):
        state = {}
        steps = {"to_device": lambda: state.update(batch=to_device(next(batches), engine.device, dtype)),
                 "forward": lambda: state.update(out=engine(state["batch"], trainer.step)),
                 "backward": lambda: engine.backward(state["out"]["loss"]),
                 "optimizer": engine.step,
                 "metrics": lambda: mean_over_data_parallel({k: v.detach().float() for k, v in state["out"].items()},
                                                            1, False)}
        for phase in PHASES:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = lambda message, *rest: (  # called where the sync happens
                    sites.update([(phase, sync_site(traceback.extract_stack()))]) if "synchroniz" in str(message)
                    else None)
                torch.cuda.set_sync_debug_mode(mode if phase != "metrics" else 0)
                try:
                    steps[phase]()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            if phase == "metrics" and mode == "warn":  # its one read: counted without the debug mode
                sites[(phase, "training/trainer.py mean_over_data_parallel (.tolist, by design)")] += 1
        trainer.step += 1

    sites = Counter()
    one_step("warn", sites)
    in_step = sum(n for (phase, _), n in sites.items() if phase != "metrics")
    result = {"syncs": in_step,
              "sites": [{"phase": p, "where": w, "count": n} for (p, w), n in sites.most_common()]}
    print(f"sync check: {in_step} host syncs in the step proper (to_device .. optimizer; "
          f"set_sync_debug_mode('warn')), then the metrics read", flush=True)
    for s in result["sites"]:
        print(f"  {s['phase']:9s} {s['count']:4d} x {s['where']}")
    if not in_step:
        try:
            one_step("error", Counter())
            result["error_mode"] = "passed"
        except RuntimeError as exc:
            result["error_mode"] = f"raised: {str(exc).splitlines()[0]}"
        print(f"  one step under set_sync_debug_mode('error'): {result['error_mode']}", flush=True)
    return result


def run_batch(trainer, args, micro: int, versions: dict) -> dict:
    import torch

    device = device_name()
    row = {"preset": args.preset, "batch": micro, "zero": trainer.engine.zero_optimization_stage(),
           "dtype": args.dtype, "attention": args.attention, "compile": args.compile,
           "compile_mode": args.compile_mode if args.compile else None,
           "checkpoint_every": args.checkpoint_every, "pack_unimodal": args.pack_unimodal,
           "data": "shards" if args.shards else "random",
           "workers": args.workers if args.shards else 0, "device": device, **versions}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batches = batch_source(trainer, args, micro)
    sample = next(batches)
    try:
        start = time.perf_counter()
        warm = timed_steps(trainer, batches, args.warmup)
        row["first_step_s"] = round(warm[0], 3) if warm else None
        row["warmup_s"] = round(time.perf_counter() - start, 3)
        times = timed_steps(trainer, batches, args.steps)
        if args.profile:
            row["profile"] = profile_step(trainer, batches, args.profile,
                                          f"{args.preset}_b{micro}_z{row['zero']}_{args.attention}"
                                          f"{'_compiled' if args.compile else ''}"
                                          f"{'_' + args.compile_mode if args.compile_mode != 'default' else ''}")
        if args.sync_check and torch.cuda.is_available() and micro == args.batches[0]:  # once per run
            row["sync_check"] = sync_check(trainer, batches)
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # cuBLAS/NCCL report theirs as RuntimeError
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        row["status"] = "OOM"
        row["error"] = str(exc).splitlines()[0][:300]
        return row
    seconds = statistics.median(times)  # shared CPUs swing +-15% from second to second
    flops, peak = flops_and_peak(trainer, micro, sample, args.dtype, device)
    tflops = flops / seconds / 1e12
    row.update(status="ok", steps=len(times), s_step=seconds, fastest_s=min(times), slowest_s=max(times),
               samples_s=micro / seconds, gflop_step=flops / 1e9, tflops=tflops,
               peak_tflops=peak, mfu=tflops / peak if peak else None)
    if torch.cuda.is_available():
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return row


def describe(row: dict) -> str:
    head = (f"step_bench preset={row['preset']} batch={row['batch']} dtype={row['dtype']} zero={row['zero']} "
            f"attention={row['attention']} compile={row['compile']} compile_mode={row.get('compile_mode')} "
            f"checkpoint_every={row['checkpoint_every']} "
            f"pack_unimodal={row.get('pack_unimodal', False)} data={row['data']} device={row['device']}: ")
    if row["status"] != "ok":
        return head + f"{row['status']} ({row.get('error', '')})"
    line = (head + f"{row['s_step']:.3f} s/step, {row['samples_s']:.3f} samples/s, {row['tflops']:.3f} TFLOP/s "
            f"({row['gflop_step']:.1f} GFLOP/step); median of {row['steps']} steps, fastest {row['fastest_s']:.3f} s, "
            f"slowest {row['slowest_s']:.3f} s; first step {row['first_step_s']} s")
    if row.get("mfu") is not None:
        line += f", MFU {100 * row['mfu']:.1f}% of {row['peak_tflops']:g} TFLOP/s"
    if row.get("peak_mem_gib") is not None:
        line += f", peak memory {row['peak_mem_gib']:.1f} GiB"
    return line


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.host_memory == "retain":
        from vlmo_large.cpu_memory import retain_freed_memory_on_cpu
        retain_freed_memory_on_cpu()

    import deepspeed
    import torch

    from vlmo_large.parallel import state

    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__}
    trainer = build_trainer(args)
    try:
        for micro in args.batches:
            row = run_batch(trainer, args, micro, versions)
            print(describe(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if row["status"] != "ok":
                break  # a larger micro-batch would not fit either; the engine may be mid-step
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        state.destroy()


if __name__ == "__main__":
    main()
