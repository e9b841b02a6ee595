"""Data pipeline cost per sample, to size the CPU cores each GPU needs.

    python benchmarks/data_bench.py [--samples 64] [--sizes 224 384] [--source-side 640] [--workers 0 1 2]

Builds a temporary shard of JPEG photos-like images (source long side --source-side, like web and
COCO images) with captions, then reports per-sample milliseconds of each step — read (tar),
decode (JPEG -> RGB), augment (the spec's train transform), tokenise, mask (whole-word MLM + block
MIM) — and the end-to-end samples/s of one worker through `build_loader`. Cores per GPU =
(samples/s one GPU consumes) / (samples/s per worker), plus one for the training process.

Then, at the first size, the loader's throughput for each --workers count, float pixels
(normalised in the worker) side by side with uint8 pixels (normalised on the device afterwards,
device_batch.to_device, timed here on the CPU as part of the uint8 path), per run and per worker
core (workers=0: the main process is the one core). The shard is replicated so every worker has
its own shards.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmo_large.data import build_loader, load_tokenizer  # noqa: E402
from vlmo_large.data.decoding import decode_image  # noqa: E402
from vlmo_large.data.masking import block_mim_mask, whole_word_mlm  # noqa: E402
from vlmo_large.data.sample_processing import seeded_global_rngs  # noqa: E402
from vlmo_large.data.sentencepiece_training import train_sentencepiece  # noqa: E402
from vlmo_large.data.shard_packing import pack_shards  # noqa: E402
from vlmo_large.data.synthetic_scenes import caption, sample_scene  # noqa: E402
from vlmo_large.data.tar_reader import read_shards  # noqa: E402
from vlmo_large.data.transforms import train_transform  # noqa: E402


def photo_like(rng: random.Random, side: int) -> bytes:
    """Smooth colour fields, shapes and noise: JPEG decode cost close to a real photo's."""
    w, h = side, int(side * 0.75)
    arr = np.random.default_rng(rng.randrange(2**31)).normal(128, 40, (h // 8, w // 8, 3)).clip(0, 255)
    img = Image.fromarray(arr.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.randrange(w), rng.randrange(h)
        draw.ellipse((x, y, x + rng.randrange(20, w // 3), y + rng.randrange(20, h // 3)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(1))
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 6, (h, w, 3))
    img = Image.fromarray((np.asarray(img) + noise).clip(0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def per_sample_ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    p.add_argument("--source-side", type=int, default=640)
    p.add_argument("--max-text-len", type=int, default=40)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        scenes = [sample_scene(rng) for _ in range(args.samples)]
        texts = [". ".join(caption(s, rng) for _ in range(2)) for s in scenes]
        items = [{"image_bytes": photo_like(rng, args.source_side), "captions": [t]} for t in texts]
        index = pack_shards(items, tmp, "image_text", samples_per_shard=args.samples, progress=False)
        tok = load_tokenizer(train_sentencepiece(texts * 4, model_path=os.path.join(tmp, "tok"), vocab_size=500))
        shard = index["pattern"].replace("{000000..000000}", "000000")

        records = [r for _, r in read_shards([shard], on_event=lambda _: None)]
        read = (lambda: [r for _, r in read_shards([shard], on_event=lambda _: None)])
        t0 = time.perf_counter()
        for _ in range(3):
            read()
        read_ms = (time.perf_counter() - t0) / 3 / len(records) * 1e3
        decode_ms = per_sample_ms(lambda r: decode_image(r["jpg"]), records)
        images = [decode_image(r["jpg"]) for r in records]
        tokenise_ms = per_sample_ms(lambda t: tok.encode(t, args.max_text_len), texts)
        encoded = [np.asarray(tok.encode(t, args.max_text_len)[0]) for t in texts]
        mrng = np.random.default_rng(0)
        mlm_ms = per_sample_ms(lambda ids: whole_word_mlm(ids, tok.word_starts(ids), rng=mrng, mask_id=tok.mask_id,
                                                          special_ids=tok.special_ids, vocab_size=tok.vocab_size),
                               encoded)
        print(f"source images: JPEG {args.source_side}x{int(args.source_side * .75)}, "
              f"{np.mean([len(r['jpg']) for r in records]) / 1024:.0f} KiB; {len(records)} samples; one core per worker\n")
        print(f"{'step (ms/sample)':<22}" + "".join(f"{s:>10}px" for s in args.sizes))
        rows: dict[str, list[float]] = {"read (tar)": [], "decode (JPEG->RGB)": [], "augment (train tf)": [],
                                        "tokenise": [], "mask (MLM + MIM)": [], "sum of steps": [],
                                        "end-to-end loader": []}
        throughput = []
        for size in args.sizes:
            tf = train_transform(size)

            def augment(pair, tf=tf):
                with seeded_global_rngs(pair[0]):  # a different draw of crop and ops per sample
                    tf(pair[1])
            aug_ms = per_sample_ms(augment, list(enumerate(images)))
            mim_ms = per_sample_ms(lambda _: block_mim_mask(size // 16, rng=mrng, ratio=0.4), records)
            loader = build_loader("image_text", shard, 16, tokenizer=tok, image_size=size,
                                  max_text_len=args.max_text_len, num_workers=0, shuffle_buffer=16)
            t0 = time.perf_counter()
            n = sum(len(b["keys"]) for b in loader)
            e2e_ms = (time.perf_counter() - t0) / n * 1e3
            steps = [read_ms, decode_ms, aug_ms, tokenise_ms, mlm_ms + mim_ms]
            for name, value in zip(rows, steps + [sum(steps), e2e_ms]):
                rows[name].append(value)
            throughput.append(1e3 / e2e_ms)
        for name, values in rows.items():
            print(f"{name:<22}" + "".join(f"{v:>12.2f}" for v in values))
        print(f"{'samples/s per worker':<22}" + "".join(f"{v:>12.1f}" for v in throughput))
        print("\ncores per GPU (data workers) for a GPU consuming N samples/s:")
        for need in (100, 250, 500, 1000):
            print(f"  N={need:<5}" + "".join(f"{need / v:>12.1f}" for v in throughput))
        worker_table(args, tmp, shard, tok)


def loader_rate(shards, tok, args, workers: int, pixels: str) -> float:
    """Samples/s through build_loader (train transform, full batches), images ready for the model."""
    from vlmo_large.data.device_batch import to_device

    loader = build_loader("image_text", shards, args.batch, tokenizer=tok, image_size=args.sizes[0],
                          max_text_len=args.max_text_len, num_workers=workers, shuffle_buffer=16, pixels=pixels)
    t0 = time.perf_counter()
    n = sum(len(to_device(b, "cpu", torch.float32)["keys"]) for b in loader)
    return n / (time.perf_counter() - t0)


def worker_table(args, tmp, shard, tok) -> None:
    copies = max(1, max(args.workers))
    shards = []
    for i in range(copies):  # one shard per worker (a worker reads whole shards)
        path = os.path.join(tmp, f"copy-{i:06d}.tar")
        shutil.copyfile(shard, path)
        shards.append(path)
    print(f"\nloader at {args.sizes[0]}px, train transform, batch {args.batch}, {copies} x {args.samples} samples "
          f"(startup of worker processes included)")
    print(f"{'workers':<9}{'float s/s':>11}{'uint8 s/s':>11}{'float /core':>13}{'uint8 /core':>13}")
    for workers in args.workers:
        rates = [loader_rate(shards, tok, args, workers, pixels) for pixels in ("float", "uint8")]
        cores = max(1, workers)
        print(f"{workers:<9}{rates[0]:>11.1f}{rates[1]:>11.1f}{rates[0] / cores:>13.1f}{rates[1] / cores:>13.1f}")


if __name__ == "__main__":
    main()
