"""The attention backends against the explicit reference on this device, fp32 (TF32 off).

    python benchmarks/gpu_attention_check.py [--preset base] [--batch 4]

Every encoder mode (image, image VL branch, text, text VL branch, fused pair) with padded text;
prints max |backend - explicit| per mode for sdpa and, where the config accepts it, flex. On a GPU
also the gradients (a fixed random projection of all outputs as the loss): max difference of the
relative-position table's gradient and of all parameters' gradients. torch's CPU flex kernel has
no backward, so on a CPU flex is compared forward only. Exits 1 when a difference exceeds --tol.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def backends(preset: str) -> list[str]:
    from vlmo_large.config import get_preset

    names = ["explicit", "sdpa"]
    try:
        get_preset(preset, attention="flex")
        names.append("flex")
    except Exception as exc:  # noqa: BLE001 - an older model without the flex backend
        print(f"flex attention unavailable here: {str(exc).splitlines()[0]}")
    return names


def outputs(model, backend: str, batch: dict) -> list[torch.Tensor]:
    for block in model.backbone.blocks:
        block.attn.backend = backend
    bb = model.backbone
    image, image_vl = bb.encode_image(batch["image"], vl_branch=True)
    text, text_vl = bb.encode_text(batch["ids"], batch["mask"], vl_branch=True)
    return [image, image_vl, text, text_vl, bb.encode_pair(batch["ids"], batch["mask"], batch["image"])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-4, help="largest accepted max abs difference")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from vlmo_large.model import build_model

    torch.manual_seed(0)
    model = build_model(args.preset, drop_path_rate=0.0).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg, B = model.cfg, args.batch
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, cfg.vocab_size, (B, cfg.max_text_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, cfg.max_text_len // 2:] = 0
    mask[min(2, B - 1), 5:] = 0
    batch = {"ids": (ids * mask).to(device), "mask": mask.to(device),
             "image": torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)}
    names = backends(args.preset)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, preset {args.preset}, "
          f"batch {B}, fp32, TF32 off; backends {names}")
    with torch.no_grad():
        ref = outputs(model, "explicit", batch)
    worst = 0.0
    for name in names[1:]:
        with torch.no_grad():
            got = outputs(model, name, batch)
        diffs = [(a - b).abs().max().item() for a, b in zip(got, ref)]
        worst = max(worst, *diffs)
        print(f"max |{name} - explicit| forward (image, image VL, text, text VL, pair): "
              + ", ".join(f"{d:.2e}" for d in diffs))
    if device == "cuda":
        weights = [torch.randn(o.shape, generator=gen).to(device) for o in ref]

        def grads(backend):
            model.zero_grad(set_to_none=True)
            loss = sum((o * w).sum() for o, w in zip(outputs(model, backend, batch), weights))
            loss.backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        ref_grads = grads("explicit")
        for name in names[1:]:
            got = grads(name)
            table = max(((got[n] - g).abs().max().item() for n, g in ref_grads.items() if "rel_pos" in n), default=0.0)
            every = max((got[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12) for n, g in ref_grads.items())
            print(f"{name} - explicit gradients: relative-position table max abs {table:.2e}, "
                  f"all parameters max relative {every:.2e}")
    print("attention check", "passed" if worst <= args.tol else f"FAILED (worst {worst:.2e} > {args.tol:g})")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
