"""Time the full stage-3 training step (every pass, backward, optimizer) on this device.

    python benchmarks/step_bench.py --preset base --batch 4 [--steps 3 --warmup 1 --dtype fp32 --zero 0]

Runs the real path: PretrainingObjective("vl") inside a DeepSpeed engine (one process, ZeRO stage
--zero, AdamW groups, clipping) on random batches with the pipeline's shapes and 15% MLM masking.
On a CPU the process keeps freed host memory as the launcher does (--host-memory default shows
the cost of glibc's defaults).
Prints samples/s, TFLOP/s and, on a GPU, MFU against the card's dense peak.

FLOPs per sample (counted per pass; activation recompute not counted):
    linear   6 * P_active * tokens per layer, where P_active is one block's attention
             (4 D^2 + 3 D) + ONE expert (2 D F + F + D) + norms (4 D), i.e. one expert per token
             (MoME routes each token to exactly one FFN)
    attention 12 * L^2 * D per layer and sequence (QK^T and AV, 2 L^2 D each, forward; x3 for
             forward + backward), bidirectional: the full L x L square
    last layer of a pass computes only the n positions that are read out (CLS for ITC, the text
             for MLM/ITM): keys and values for all L tokens (6 * (2 D^2 + D) * L), the rest for n
             (6 * (P_active - 2 D^2 - D) * n), attention 12 * n * L * D
    passes   image (L = N+1) through depth layers + (depth - vl_start) VL-branch layers, n = 1;
             text (L = T) likewise; fused pairs (L = T + N + 1) through depth layers, n = T,
             4 of them per sample (1 MLM + 3 ITM)
    + patch embedding 6 * 3 p^2 D per patch per image-carrying pass, ITC heads 6 * 4 D^2,
      pooler + ITM head 6 * 3 (D^2 + 2 D), MLM head 6 * (D^2 + D V) per masked token
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PEAK_TFLOPS = {  # dense, per GPU
    "H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}


def flops_per_sample(cfg, mlm_prob: float = 0.15) -> float:
    D, F, depth, vl = cfg.embed_dim, cfg.ffn_dim, cfg.depth, cfg.num_vl_layers
    layer_params = 4 * D * D + 3 * D + 2 * D * F + F + D + 4 * D
    kv_params = 2 * D * D + D
    n_img, T = cfg.num_patches + 1, cfg.max_text_len
    n_pair = T + n_img

    def encoder(tokens: int, layers: int, kept: int) -> float:
        if layers == 0:
            return 0.0
        full = 6 * layer_params * tokens + 12 * tokens ** 2 * D
        last = 6 * kv_params * tokens + 6 * (layer_params - kv_params) * kept + 12 * kept * tokens * D
        return (layers - 1) * full + last

    total = sum(encoder(L, depth, 1) + encoder(L, vl, 1) for L in (n_img, T)) + 4 * encoder(n_pair, depth, T)
    total += 6 * 3 * cfg.patch_size ** 2 * D * cfg.num_patches * 5  # image pass + 4 fused pairs
    total += 6 * 4 * D * D + 6 * 3 * (D * D + 2 * D) + 6 * (D * D + D * cfg.vocab_size) * mlm_prob * T
    return float(total)


def build(preset: str, batch: int, dtype: str, zero: int = 0, attention: str = "auto"):
    import torch

    from vlmo_large.parallel import state
    from vlmo_large.training.engine import build_engine
    from vlmo_large.training.objectives import PretrainingObjective
    from vlmo_large.training.run_config import build_dataclass, RunConfig
    from vlmo_large.training.validation import resolve_run

    cfg = build_dataclass(RunConfig, {"preset": preset, "stage": "vl", "data": {"source": "random"},
                                      "model": {"attention": attention},
                                      "batch": {"micro": batch}, "schedule": {"steps": 10 ** 6, "warmup": 10}})
    ds = {"zero_optimization": {"stage": zero}, "bf16": {"enabled": dtype == "bf16"}}
    resolved = resolve_run(cfg, ds, 1)
    state.ensure_initialized(1, 1)
    from vlmo_large.model import build_model

    torch.manual_seed(0)
    model = build_model(resolved.model)
    objective = PretrainingObjective(model, "vl", group=state.dp_group())
    return build_engine(objective, resolved, cfg), model.cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                        help="ZeRO stage of the one-process engine (0: nothing to partition)")
    parser.add_argument("--attention", choices=("auto", "sdpa", "explicit"), default="auto")
    parser.add_argument("--host-memory", choices=("retain", "default"), default="retain",
                        help="retain: keep freed host memory, as launchers/pretrain.py does on a CPU")
    args = parser.parse_args()
    if args.host_memory == "retain":
        from vlmo_large.cpu_memory import retain_freed_memory_on_cpu
        retain_freed_memory_on_cpu()

    import torch

    from vlmo_large.training.random_batches import random_batch
    from vlmo_large.training.trainer import to_device

    engine, cfg = build(args.preset, args.batch, args.dtype, args.zero, args.attention)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batches = [to_device(random_batch("image_text", cfg, args.batch, torch.Generator().manual_seed(i)),
                         engine.device, dtype) for i in range(args.warmup + args.steps)]

    def step(i: int) -> float:
        out = engine(batches[i], i)
        engine.backward(out["loss"])
        engine.step()
        return out["loss"].item()  # forces completion (CUDA included)

    for i in range(args.warmup):
        step(i)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        start = time.perf_counter()
        step(i)  # .item() inside: the step has finished on any device
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)  # shared CPUs swing +-15% from second to second
    samples_per_s = args.batch / seconds
    tflops = flops_per_sample(cfg) * samples_per_s / 1e12
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    line = (f"step_bench preset={args.preset} batch={args.batch} dtype={args.dtype} zero={args.zero} attention={args.attention} "
            f"host-memory={args.host_memory} device={device}: "
            f"{seconds:.3f} s/step, {samples_per_s:.3f} samples/s, {tflops:.3f} TFLOP/s "
            f"({flops_per_sample(cfg) / 1e9:.1f} GFLOP/sample); median of {args.steps} steps, "
            f"fastest {min(times):.3f} s, slowest {max(times):.3f} s")
    peak = next((v[args.dtype] for k, v in PEAK_TFLOPS.items() if k in device), None)
    if peak:
        line += f", MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s"
    print(line, flush=True)
    from vlmo_large.parallel import state
    state.destroy()


if __name__ == "__main__":
    main()
