"""Pack samples into webdataset tar shards, in parallel, with an index and a skip report.

Shard contents by kind (what the loader reads):
    image_text: <key>.<jpg|png|webp> + <key>.txt (one caption) or <key>.json ({"captions": [...]})
    image:      <key>.<jpg|png|webp>
    text:       <key>.txt
    vqa:        <key>.<jpg|png|webp> + <key>.json ({"question": str, "answers": [the human answers, 10 in
                VQA v2, none in a test split], "qid": int}); one sample per question
    nlvr2:      <key>.img0.<ext> (left image) + <key>.img1.<ext> (right image) + <key>.json ({"sentence": str,
                "label": true|false, "id": the example's identifier}); one sample per statement
`index.json` beside the shards: {"kind", "pattern", "samples", "shards": [{"name", "samples"}],
"skipped": {reason: count}}. Every input problem is skipped and counted, never fatal. Extra table
columns go into `<key>.meta.json`; a held-out split also gets `<prefix>-retrieval.json`.
"""
from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from multiprocessing import get_context
from typing import Iterable, Sequence

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vlmo_large.data.decoding import to_rgb
from vlmo_large.data.pair_tables import TableRows

_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ----- reading inputs into items -------------------------------------------------------------
def image_text_items(rows: TableRows, *, group_captions: bool = False) -> list[dict]:
    """Items from table rows (pair_tables.read_pair_table), in order of each image's first row.

    group_captions: one sample per image holding all its captions (and its first row's metadata),
    else one sample per caption (with its own row's metadata)."""
    by_image: dict[str, list[tuple[str, dict]]] = {}
    for image, caps, meta in rows.rows:
        by_image.setdefault(image, []).extend((c, meta) for c in caps)
    if group_captions:
        return [{"image": img, "captions": [c for c, _ in caps], "meta": caps[0][1]}
                for img, caps in by_image.items() if caps]
    return [{"image": img, "captions": [c], "meta": meta} for img, caps in by_image.items() for c, meta in caps]


def split_heldout(rows: TableRows, count: int, seed: int = 0) -> tuple[TableRows, TableRows]:
    """(train, held-out): `count` images drawn at random (with all their rows) are held out."""
    images = sorted({image for image, caps, _ in rows.rows if caps})
    held = set(random.Random(seed).sample(images, min(count, len(images))))
    train, heldout = TableRows(skipped=rows.skipped, problems=rows.problems), TableRows()
    for row in rows.rows:
        (heldout if row[0] in held else train).rows.append(row)
    return train, heldout


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


def _image_entry(source: str | bytes, max_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of an image given as a path or as its bytes."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            with open(source, "rb") as f:
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
    if not isinstance(value, str):  # None, 5, [...]: no caption, not "None" or "5"
        raise _Skip("caption_not_text")
    text = " ".join(value.split())
    if not text:
        raise _Skip("empty_text")
    return text


def _sample(kind: str, item: dict, key: str, max_side: int | None) -> tuple[dict, list[str]]:
    """The sample to write and its captions (image_text)."""
    sample, caps = {"__key__": key}, []
    if kind in ("image_text", "image", "vqa"):
        ext, data = _image_entry(item["image_bytes"] if "image_bytes" in item else item["image"], max_side)
        sample[ext] = data
    if kind == "nlvr2":
        for number, source in enumerate(item["images"]):
            ext, data = _image_entry(source, max_side)
            sample[f"img{number}.{ext}"] = data
    if kind in ("vqa", "nlvr2"):
        sample["json"] = json.dumps(item["json"], ensure_ascii=False).encode()
    if kind == "image_text":
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
    if item.get("meta"):  # the table's other columns (labels, ids): read by nothing in training
        sample["meta.json"] = json.dumps(item["meta"], ensure_ascii=False).encode()
    for name, value in item.get("extra", {}).items():  # e.g. metadata json of synthetic scenes
        sample[name] = value
    return sample, caps


def _write_shard(job) -> tuple[str, int, dict, list]:
    """(shard name, samples written, skips, [(key, captions)] of the written samples if `record`)."""
    kind, path, items, first_index, key_prefix, max_side, mtime, record = job
    skipped, written, captions = Counter(), 0, []
    with wds.TarWriter(path + ".tmp", mtime=mtime) as sink:
        for offset, item in enumerate(items):
            key = item.get("key") or f"{key_prefix}{first_index + offset:09d}"
            try:
                sample, caps = _sample(kind, item, key, max_side)
                sink.write(sample)
                written += 1
                if record:
                    captions.append((key, caps))
            except _Skip as skip:
                skipped[str(skip)] += 1
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written shard behind
    return os.path.basename(path), written, dict(skipped), captions


def retrieval_gold(written: list[tuple[str, list[str]]]) -> dict:
    """The held-out retrieval JSON (eval.retrieval_json, evaluation/heldout_retrieval.py) of written
    (image key, captions): every caption of every image and the gold mapping both ways."""
    gold = {"images": [], "texts": [], "img2txt": [], "txt2img": []}
    for i, (key, caps) in enumerate(written):
        gold["images"].append(key)
        gold["img2txt"].append(list(range(len(gold["texts"]), len(gold["texts"]) + len(caps))))
        gold["texts"] += caps
        gold["txt2img"] += [i] * len(caps)
    return gold


# ----- packing --------------------------------------------------------------------------------
def pack_shards(items: Sequence[dict], out_dir: str, kind: str, *, samples_per_shard: int = 10000,
                max_image_side: int | None = None, num_procs: int = 1, prefix: str = "shard",
                key_prefix: str = "", progress: bool = True, mtime: float | None = None,
                retrieval_json: bool = False, skipped_before: dict | None = None) -> dict:
    """Write `items` as shards `<out_dir>/<prefix>-NNNNNN.tar` plus `<prefix>-index.json`;
    return the index. Items: {"image": path | "image_bytes": bytes, "captions": [...],
    "text": str|bytes, "key": optional, "meta": {column: value}, "extra": {ext: bytes}}; vqa:
    {"image"|"image_bytes", "json": {...}}, nlvr2: {"images": [left, right] (paths or bytes), "json": {...}}
    (the module doc has the json fields; the readers vqa_tables / nlvr2_tables make these). A fixed
    `mtime` makes the shard bytes reproducible (default: the current time). retrieval_json
    (image_text, one item per image): also write `<prefix>-retrieval.json` (retrieval_gold), its path
    in the index as "retrieval_json". skipped_before: counts of what was skipped before packing
    (bad table rows), added to the index's."""
    if kind not in ("image_text", "image", "text", "vqa", "nlvr2"):
        raise ValueError(f"unknown kind {kind!r}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for n, start in enumerate(range(0, len(items), samples_per_shard)):
        path = os.path.join(out_dir, f"{prefix}-{n:06d}.tar")
        jobs.append((kind, path, list(items[start:start + samples_per_shard]), start, key_prefix, max_image_side, mtime,
                     retrieval_json))
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
    skipped = Counter(skipped_before or {})
    for _, _, s, _ in results:
        skipped.update(s)
    index = {"kind": kind, "samples": sum(r[1] for r in results),
             "pattern": os.path.join(out_dir, f"{prefix}-{{000000..{max(len(jobs) - 1, 0):06d}}}.tar"),
             "shards": [{"name": name, "samples": count} for name, count, _, _ in results],
             "skipped": dict(skipped)}
    if retrieval_json:
        index["retrieval_json"] = os.path.join(out_dir, f"{prefix}-retrieval.json")
        with open(index["retrieval_json"], "w") as f:
            json.dump(retrieval_gold([w for r in results for w in r[3]]), f, ensure_ascii=False)
    with open(os.path.join(out_dir, f"{prefix}-index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index


def describe_skips(index: dict) -> str:
    if not index["skipped"]:
        return "nothing skipped"
    return "skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(index["skipped"].items()))
