"""Forward+backward throughput of a preset next to timm's BEiT of the same width and depth.

    python benchmarks/model_bench.py --preset base --batch 4 [--device cuda --dtype bf16]

Prints samples/s for the vision-only path (the same attention + FFN over 1 + N tokens as timm's
BEiT), the text-only and fused paths, and ratios measured side by side in this one process.

Every round times each path once, in an order that reverses from round to round, and each ratio is
taken within a round; the report gives the median over rounds with its quartiles, next to the
ratio of the best times. On a machine whose speed comes and goes in bursts (shared CPUs), the
best-of ratio is biased against the longer pass, which is less likely to fit in a quiet spell;
the within-round median is not.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import timm  # noqa: E402
import torch  # noqa: E402

from vlmo_large.model import build_model  # noqa: E402
from vlmo_large.parallel.parallelize import parallelize, plan_from_config  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--attention", choices=["auto", "sdpa", "flex", "explicit"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (parallel/parallelize.py)")
    p.add_argument("--host-memory", choices=("retain", "default"), default="retain",
                   help="retain: keep freed host memory (both models), as launchers/pretrain.py does on a CPU")
    p.add_argument("--decompose", action="store_true",
                   help="also time the fused sequence with its fused-only work taken away step by step")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_time(fn, device, dtype) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = fn()
    out.float().mean().backward()
    sync(device)
    return time.perf_counter() - start


def timm_beit(cfg):
    return timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0,
                             img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                             depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.ffn_dim / cfg.embed_dim,
                             init_values=cfg.layer_scale_init, use_rel_pos_bias=cfg.use_rel_pos_bias,
                             use_abs_pos_emb=cfg.use_abs_pos_emb, drop_path_rate=0.0)


FUSED_VARIANTS = ("  one expert", "  + no text embedding")


def fused_variants(bb, ids, images) -> dict:
    """The fused sequence minus its fused-only work, cumulatively: first every position through the
    vision expert (no second expert per layer), then fixed text states instead of the text
    embedding (no vocabulary gradient). What is left next to image-only is attention over the
    longer sequence. Timing aids only: these are not the model's computations."""
    text_len, depth = ids.shape[1], bb.cfg.depth
    fixed_text = bb.embed_text(ids).detach()

    def one_expert(text_states):
        x = torch.cat([text_states(), bb.embed_image(images)], 1)
        return bb.norm(bb.run_blocks(x, ["imag"] * depth, bb._bias("pair", text_len), None, text_len))

    return {FUSED_VARIANTS[0]: lambda: one_expert(lambda: bb.embed_text(ids)),
            FUSED_VARIANTS[1]: lambda: one_expert(lambda: fixed_text)}


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.host_memory == "retain" and device.type == "cpu":
        from vlmo_large.cpu_memory import retain_freed_memory
        retain_freed_memory()
    torch.manual_seed(0)
    model = build_model(args.preset, drop_path_rate=0.0, attention=args.attention, compile=args.compile).to(device)
    parallelize(model, plan_from_config(model.cfg))
    cfg = model.cfg
    beit = timm_beit(cfg).to(device)
    B, T = args.batch, min(args.text_len, cfg.max_text_len)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(1, cfg.vocab_size, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    bb = model.backbone
    runs = {
        "vlmo image-only": lambda: bb.encode_image(images),
        "timm BEiT": lambda: beit.forward_features(images),
        "vlmo text-only": lambda: bb.encode_text(ids, mask),
        "vlmo fused pair": lambda: bb.encode_pair(ids, mask, images),
    }
    tokens = {"vlmo image-only": cfg.num_patches + 1, "timm BEiT": cfg.num_patches + 1,
              "vlmo text-only": T, "vlmo fused pair": T + cfg.num_patches + 1}
    if args.decompose:
        runs.update(fused_variants(bb, ids, images))
        tokens.update({name: tokens["vlmo fused pair"] for name in FUSED_VARIANTS})
    for fn in runs.values():  # warm-up
        step_time(fn, device, args.dtype)
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in (list(runs) if r % 2 == 0 else reversed(runs)):
            model.zero_grad(set_to_none=True)
            beit.zero_grad(set_to_none=True)
            times[name].append(step_time(runs[name], device, args.dtype))
    print(f"preset={args.preset} batch={B} device={device} dtype={args.dtype} attention={args.attention} compile={args.compile} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"{'path':<24}{'tokens':>8}{'best s':>10}{'median s':>10}{'samples/s':>11}{'tokens/s':>10}")
    for name in runs:
        fastest, median = min(times[name]), statistics.median(times[name])
        print(f"{name:<24}{tokens[name]:>8}{fastest:>10.4f}{median:>10.4f}{B / fastest:>11.2f}"
              f"{B / fastest * tokens[name]:>10.0f}")

    def per_token(t, name):
        return t[name] / tokens[name]

    ratios = [  # each maps {path: step time} to one ratio
        ("vlmo image-only vs timm BEiT, samples/s", ">= 1.0",
         lambda t: t["timm BEiT"] / t["vlmo image-only"]),
        ("fused pair vs timm BEiT, time per token", "<= 1.0",
         lambda t: per_token(t, "vlmo fused pair") / per_token(t, "timm BEiT")),
        ("fused pair vs vlmo image-only, time per token", "",
         lambda t: per_token(t, "vlmo fused pair") / per_token(t, "vlmo image-only")),
    ]
    ratios += [(f"{name} vs vlmo image-only, per token", "",
                lambda t, name=name: per_token(t, name) / per_token(t, "vlmo image-only"))
               for name in FUSED_VARIANTS if name in runs]
    rounds = [{name: times[name][r] for name in runs} for r in range(args.rounds)]
    best = {name: min(times[name]) for name in runs}
    print(f"{'ratio':<56}{'median':>8}{'quartiles':>15}{'of best':>9}  target")
    for label, target, ratio in ratios:
        values = [ratio(t) for t in rounds]
        low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        print(f"{label:<56}{statistics.median(values):>8.3f}{f'{low:.3f}-{high:.3f}':>15}"
              f"{ratio(best):>9.3f}  {target}")


if __name__ == "__main__":
    main()
