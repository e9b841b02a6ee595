"""Forward+backward throughput of a preset next to timm's BEiT of the same width and depth.

    python benchmarks/model_bench.py --preset base --batch 4 [--device cuda --dtype bf16]

Prints samples/s for the vision-only path (the same attention + FFN over 1 + N tokens as timm's
BEiT), the text-only and fused paths, and ratios measured side by side in this one process. The
two models are timed in alternation so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import timm  # noqa: E402
import torch  # noqa: E402

from vlmo_large.model import build_model  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--attention", choices=["auto", "sdpa", "explicit"], default="auto")
    p.add_argument("--host-memory", choices=("retain", "default"), default="retain",
                   help="retain: keep freed host memory (both models), as launchers/pretrain.py does on a CPU")
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


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.host_memory == "retain" and device.type == "cpu":
        from vlmo_large.cpu_memory import retain_freed_memory
        retain_freed_memory()
    torch.manual_seed(0)
    model = build_model(args.preset, drop_path_rate=0.0, attention=args.attention).to(device)
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
    for fn in runs.values():  # warm-up
        step_time(fn, device, args.dtype)
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            model.zero_grad(set_to_none=True)
            beit.zero_grad(set_to_none=True)
            best[name] = min(best[name], step_time(fn, device, args.dtype))
    print(f"preset={args.preset} batch={B} device={device} dtype={args.dtype} attention={args.attention} "
          f"threads={torch.get_num_threads()}")
    print(f"{'path':<18}{'tokens':>8}{'step s':>10}{'samples/s':>12}{'tokens/s':>12}")
    for name in runs:
        sps = B / best[name]
        print(f"{name:<18}{tokens[name]:>8}{best[name]:>10.4f}{sps:>12.2f}{sps * tokens[name]:>12.0f}")
    ratio = best["timm BEiT"] / best["vlmo image-only"]
    per_token_fused = (best["vlmo fused pair"] / tokens["vlmo fused pair"]) / (
        best["vlmo image-only"] / tokens["vlmo image-only"])
    print(f"ratio vlmo image-only / timm BEiT samples/s: {ratio:.3f} (target >= 1.0)")
    print(f"fused per-token time / image-only per-token time: {per_token_fused:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
