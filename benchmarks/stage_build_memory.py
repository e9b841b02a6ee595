"""Host memory of building one pipeline stage: VLMo on meta, then only the stage materialised.

One fresh process per stage (and one for the whole model): after importing torch and the package
it resets the kernel's peak-RSS mark (/proc/self/clear_refs 5), builds
(parallel/stage_build.py build_stage, or build_model for the whole), and reports the peak RSS
(VmHWM) above the RSS before the build, next to the stage's own parameter bytes
(memory.py params_per_stage, fp32). Issue 13's bar: peak <= own stage + 20%.

    python benchmarks/stage_build_memory.py [--preset xl_6b] [--pp 4] [--width 1280]

--width shrinks the preset (ffn 4x width, head dim kept) where the machine cannot hold a stage of
the full width; the table header says which width was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from benchmarks.convert_bench import _status_kb  # noqa: E402

GB = 1e9


def model_config(preset: str, width: int | None):
    from vlmo_large.config import get_preset
    cfg = get_preset(preset)
    if width is None:
        return cfg
    head_dim = cfg.embed_dim // cfg.num_heads
    return cfg.replace(embed_dim=width, ffn_dim=4 * width, num_heads=width // head_dim)


def measure(preset: str, width: int | None, pp: int, stage: int) -> None:
    """In this process: build stage `stage` (-1: the whole model); print one JSON line."""
    import torch  # noqa: F401  (imported before the baseline)

    from vlmo_large.memory import params_per_stage
    from vlmo_large.model import build_model
    from vlmo_large.parallel.stage_build import build_stage

    cfg = model_config(preset, width)
    own = params_per_stage(cfg, 1, pp)
    own_bytes = 4 * (sum(own) if stage < 0 else own[stage])
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS from here on
        f.write("5")
    before = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    model = build_model(cfg, seed=0) if stage < 0 else build_stage(cfg, stage, pp, seed=0)
    seconds = time.perf_counter() - start
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    peak = _status_kb("VmHWM") * 1024 - before
    print(json.dumps({"stage": stage, "own_bytes": own_bytes, "held_bytes": held, "peak_bytes": peak,
                      "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xl_6b")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--width", type=int, help="shrink the preset to this embed_dim")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-model build")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        measure(args.preset, args.width, args.pp, args.child)
        return
    cfg = model_config(args.preset, args.width)
    shape = f"width {cfg.embed_dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads, depth {cfg.depth}, vocab {cfg.vocab_size}"
    print(f"{args.preset} ({shape}{', shrunk' if args.width else ''}), PP={args.pp}, fp32, TP=1")
    print("| stage | own stage GB | held GB | peak GB | peak / own | s |")
    print("|---|---|---|---|---|---|")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for stage in list(range(args.pp)) + ([] if args.no_whole else [-1]):
        command = [sys.executable, __file__, "--preset", args.preset, "--pp", str(args.pp), "--child", str(stage)]
        command += ["--width", str(args.width)] if args.width else []
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {'whole' if stage < 0 else stage} | {row['own_bytes'] / GB:.2f} | {row['held_bytes'] / GB:.2f} "
              f"| {row['peak_bytes'] / GB:.2f} | {row['peak_bytes'] / row['own_bytes']:.3f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
