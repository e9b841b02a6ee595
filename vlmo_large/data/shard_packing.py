"""Pack samples into webdataset tar shards, in parallel, with an index and a skip report.

Shard contents by kind (what the loader reads):
    image_text: <key>.<jpg|png|webp> + <key>.txt (one caption) or <key>.json ({"captions": [...]})
    image:      <key>.<jpg|png|webp>
    text:       <key>.txt
`index.json` beside the shards: {"kind", "pattern", "samples", "shards": [{"name", "samples"}],
"skipped": {reason: count}}. Every input problem is skipped and counted, never fatal.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from multiprocessing import get_context
from typing import Iterable, Sequence

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vlmo_large.data.decoding import to_rgb

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ----- reading inputs into items -------------------------------------------------------------
def image_text_items(table: str, *, group_captions: bool = False, image_root: str | None = None) -> list[dict]:
    """Items from a CSV (columns image, caption) or JSONL ({"image", "caption" | "captions"}).

    Relative image paths are taken relative to `image_root` (default: the table's folder).
    group_captions: one sample per image holding all its captions, else one sample per caption.
    """
    root = image_root or os.path.dirname(os.path.abspath(table))
    by_image: dict[str, list[str]] = {}
    if table.endswith(".csv"):
        with open(table, newline="", encoding="utf-8", errors="replace") as f:
            rows = [(r.get("image"), [r.get("caption") or ""]) for r in csv.DictReader(f)]
    else:
        rows = []
        with open(table, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    caps = rec.get("captions", [rec.get("caption") or ""])
                    rows.append((rec.get("image"), [caps] if isinstance(caps, str) else list(caps)))
    for image, caps in rows:
        by_image.setdefault(os.path.join(root, image or ""), []).extend(caps)
    if group_captions:
        return [{"image": img, "captions": caps} for img, caps in by_image.items()]
    return [{"image": img, "captions": [c]} for img, caps in by_image.items() for c in caps]


def image_folder_items(folder: str, extensions=("jpg", "jpeg", "png", "webp", "bmp")) -> list[dict]:
    paths = []
    for dirpath, _, names in os.walk(folder):
        paths.extend(os.path.join(dirpath, n) for n in names if n.lower().rsplit(".", 1)[-1] in extensions)
    return [{"image": p} for p in sorted(paths)]


def text_file_items(files: Sequence[str], *, documents: bool = False) -> list[dict]:
    """One sample per non-empty line, or per document (blank-line separated) when `documents`.
    Text stays bytes here: its decoding is checked (and counted) by the packing workers."""
    items = []
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if documents:
            chunks = [b" ".join(l.strip() for l in doc.splitlines()) for doc in data.replace(b"\r\n", b"\n").split(b"\n\n")]
        else:
            chunks = [l.strip() for l in data.splitlines()]
        items.extend({"text": c} for c in chunks if c)
    return items


# ----- converting one item ------------------------------------------------------------------
class _Skip(Exception):
    pass


def _image_entry(item: dict, max_side: int | None) -> tuple[str, bytes]:
    if "image_bytes" in item:
        data = item["image_bytes"]
    else:
        try:
            with open(item["image"], "rb") as f:
                data = f.read()
        except OSError:
            raise _Skip("missing_image_file") from None
    if not data:
        raise _Skip("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        raise _Skip("corrupt_image") from None
    if img.width == 0 or img.height == 0:
        raise _Skip("empty_image")
    ext = _FORMAT_EXT.get(img.format or "")
    if ext and (not max_side or max(img.size) <= max_side):
        return ext, data  # stored untouched: no re-encoding loss
    img = to_rgb(img)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return "jpg", out.getvalue()


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("bad_text_encoding") from None
    text = " ".join(str(value).split())
    if not text:
        raise _Skip("empty_text")
    return text


def _sample(kind: str, item: dict, key: str, max_side: int | None) -> dict:
    sample = {"__key__": key}
    if kind in ("image_text", "image"):
        ext, data = _image_entry(item, max_side)
        sample[ext] = data
    if kind == "image_text":
        caps = []
        for c in item.get("captions") or []:
            try:
                caps.append(_text(c))
            except _Skip:
                pass
        if not caps:
            raise _Skip("empty_caption")
        if len(caps) == 1:
            sample["txt"] = caps[0]
        else:
            sample["json"] = json.dumps({"captions": caps}).encode()
    if kind == "text":
        sample["txt"] = _text(item.get("text", ""))
    for name, value in item.get("extra", {}).items():  # e.g. metadata json of synthetic scenes
        sample[name] = value
    return sample


def _write_shard(job) -> tuple[str, int, dict]:
    kind, path, items, first_index, key_prefix, max_side, mtime = job
    skipped, written = Counter(), 0
    with wds.TarWriter(path + ".tmp", mtime=mtime) as sink:
        for offset, item in enumerate(items):
            key = item.get("key") or f"{key_prefix}{first_index + offset:09d}"
            try:
                sink.write(_sample(kind, item, key, max_side))
                written += 1
            except _Skip as skip:
                skipped[str(skip)] += 1
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written shard behind
    return os.path.basename(path), written, dict(skipped)


# ----- packing --------------------------------------------------------------------------------
def pack_shards(items: Sequence[dict], out_dir: str, kind: str, *, samples_per_shard: int = 10000,
                max_image_side: int | None = None, num_procs: int = 1, prefix: str = "shard",
                key_prefix: str = "", progress: bool = True, mtime: float | None = None) -> dict:
    """Write `items` as shards `<out_dir>/<prefix>-NNNNNN.tar` plus `<prefix>-index.json`;
    return the index. Items: {"image": path | "image_bytes": bytes, "captions": [...],
    "text": str|bytes, "key": optional, "extra": {ext: bytes}}. A fixed `mtime` makes the shard
    bytes reproducible (default: the current time)."""
    if kind not in ("image_text", "image", "text"):
        raise ValueError(f"unknown kind {kind!r}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for n, start in enumerate(range(0, len(items), samples_per_shard)):
        path = os.path.join(out_dir, f"{prefix}-{n:06d}.tar")
        jobs.append((kind, path, list(items[start:start + samples_per_shard]), start, key_prefix, max_image_side, mtime))
    results = []
    bar = tqdm(total=len(jobs), desc=f"packing {kind}", unit="shard", disable=not progress)
    if num_procs > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(min(num_procs, len(jobs))) as pool:
            for res in pool.imap_unordered(_write_shard, jobs):
                results.append(res)
                bar.update()
    else:
        for job in jobs:
            results.append(_write_shard(job))
            bar.update()
    bar.close()
    results.sort()
    skipped = Counter()
    for _, _, s in results:
        skipped.update(s)
    index = {"kind": kind, "samples": sum(r[1] for r in results),
             "pattern": os.path.join(out_dir, f"{prefix}-{{000000..{max(len(jobs) - 1, 0):06d}}}.tar"),
             "shards": [{"name": name, "samples": count} for name, count, _ in results],
             "skipped": dict(skipped)}
    with open(os.path.join(out_dir, f"{prefix}-index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


def describe_skips(index: dict) -> str:
    if not index["skipped"]:
        return "nothing skipped"
    return "skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(index["skipped"].items()))
