"""Peak memory and step time of forward+backward with and without activation checkpointing.

    python benchmarks/activation_checkpoint_bench.py [--preset base --batch 8 --every 0 1 2]

Each setting runs in its own process so peak memory is measured cleanly: on a GPU the allocator's
peak (torch.cuda.max_memory_allocated), on the CPU the process's peak resident set (ru_maxrss)
minus the resident set before the step (the weights and the framework).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def measure(preset: str, batch: int, every: int, device: str) -> dict:
    import torch

    from vlmo_large.model import build_model
    torch.manual_seed(0)
    model = build_model(preset, drop_path_rate=0.0).to(device).train()
    model.backbone.set_grad_checkpointing(every)
    cfg = model.cfg
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(1, cfg.vocab_size, (batch, cfg.max_text_len), device=device)
    mask = torch.ones_like(ids)
    step = lambda: model.backbone.encode_pair(ids, mask, images).float().pow(2).mean().backward()  # noqa: E731
    if device == "cuda":  # warm up kernels; the CPU's peak RSS never resets, so no warm-up there
        step()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"every": every, "seconds": time.perf_counter() - start, "peak_mib": peak / 2 ** 20,
            "loss_check": float(sum(p.grad.double().sum() for p in model.parameters() if p.grad is not None))}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--every", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child is not None:
        print(json.dumps(measure(args.preset, args.batch, args.child, device)))
        return
    rows = []
    for every in args.every:
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch),
                              "--device", device, "--child", str(every)], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"preset={args.preset} (fused pass, {args.batch} pairs) device={device}")
    print(f"{'checkpoint every':<18}{'step s':>10}{'peak extra MiB':>16}{'vs none':>10}")
    base = rows[0]
    for r in rows:
        label = "none" if r["every"] == 0 else f"{r['every']} block(s)"
        print(f"{label:<18}{r['seconds']:>10.3f}{r['peak_mib']:>16.1f}{r['peak_mib'] / base['peak_mib']:>10.2f}")
    same = all(abs(r["loss_check"] - base["loss_check"]) <= 1e-6 * abs(base["loss_check"]) for r in rows)
    print(f"gradient checksums equal across settings: {same}")


if __name__ == "__main__":
    main()
