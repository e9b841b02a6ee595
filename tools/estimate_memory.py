"""Parameter counts and per-GPU memory of a preset on a parallel layout.

    python tools/estimate_memory.py --preset large --tp 1 --dp 16 --zero 3 --micro-batch 32
    python tools/estimate_memory.py --preset giant --tp 4 --pp 2 --dp 8 --zero 1 --json

Nothing is allocated: the model is built on the meta device. See vlmo_large/memory.py for the
accounting (DeepSpeed's model-state formulas, Megatron's activation estimate).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Estimate parameters and per-GPU memory of a VLMo preset.")
    p.add_argument("--preset", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="card memory the layout must fit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import warnings
    warnings.filterwarnings("ignore")
    from vlmo_large.config import get_preset
    from vlmo_large.memory import Layout, estimate

    args = parse_args(argv)
    layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, zero=args.zero, micro_batch=args.micro_batch,
                    dtype=args.dtype, checkpoint_activations=not args.no_activation_checkpointing)
    try:
        result = estimate(get_preset(args.preset), layout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["fits_gpu"] = result["total_gib"] <= args.gpu_gib
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"preset {args.preset}: layout TP={args.tp} PP={args.pp} DP={args.dp} ZeRO-{args.zero} "
          f"micro-batch {args.micro_batch} {args.dtype}")
    for key in ("backbone_params", "total_params", "attention_params", "expert_imag_params",
                "expert_text_params", "expert_vl_params", "active_params_per_token", "params_per_gpu"):
        print(f"  {key:<26}{result[key]:>16,}")
    print(f"  {'model states / GPU':<26}{result['model_states_gib']:>13.2f} GiB")
    print(f"  {'activations / GPU':<26}{result['activations_gib']:>13.2f} GiB")
    print(f"  {'total / GPU':<26}{result['total_gib']:>13.2f} GiB  "
          f"({'fits' if result['fits_gpu'] else 'does NOT fit'} {args.gpu_gib:.0f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
