"""The built-in dataset: rendered shape scenes with captions, for demos, tests and smoke runs.

    manifest = make_synthetic("runs/synth")        # ~seconds; reused when already complete
    loader = build_loader("image_text", manifest["image_text"]["train"], 32,
                          tokenizer=load_tokenizer(manifest["tokenizer"]), image_size=64,
                          max_text_len=32, augment=manifest["recommended_augment"])

Contents (all deterministic in `seed`; each portion has its own generator, so changing one size
leaves the other portions unchanged):
- image_text train/val shards (one caption per image), image-only and text-only train/val shards
  (text samples are 1-6 caption sentences, a small "document" for stage-2 MLM);
- retrieval: held-out images with `retrieval_captions` captions each, as an image_text shard with
  all captions together, plus retrieval.json (image keys, texts, gold img2txt / txt2img);
- vqa/{train,val}.json: {"qid", "image", "question", "answer", "answers"}, and nlvr2/{train,val}.json:
  {"id", "images": [left, right], "sentence", "label"}; image paths are relative to the JSON file; the
  same packed as shards of the loader's kinds "vqa" and "nlvr2" (vqa/<split>-NNNNNN.tar, nlvr2/...,
  manifest[task]["<split>_shards"]), and vqa/answers.json, every answer (the loader's `answers`);
- tokenizer.model: SentencePiece trained on all the text (vocabulary far below the tiny preset's 1024);
- manifest.json listing every path (absolute) and the arguments it was made with.
Captions name sides and colours, so train with augment="light" (no flips or colour operations).
"""
from __future__ import annotations

import json
import os
import random
import time

from vlmo_large.data.nlvr2_tables import read_nlvr2
from vlmo_large.data.pair_tables import SkipLog
from vlmo_large.data.sentencepiece_training import train_sentencepiece
from vlmo_large.data.shard_packing import pack_shards
from vlmo_large.data.synthetic_scenes import caption, png_bytes, question, render, sample_scene, statement
from vlmo_large.data.vqa_tables import read_vqa

MANIFEST = "manifest.json"
FORMAT = 2  # 2: vqa / nlvr2 shards; a manifest of another format is made again


def _pairs(rng: random.Random, n: int, size: int, captions_per_image: int = 1) -> list[dict]:
    items = []
    for _ in range(n):
        scene = sample_scene(rng)
        items.append({"image_bytes": png_bytes(render(scene, size, rng)),
                      "captions": [caption(scene, rng) for _ in range(captions_per_image)]})
    return items


def _images(rng: random.Random, n: int, size: int) -> list[dict]:
    return [{"image_bytes": png_bytes(render(sample_scene(rng), size, rng))} for _ in range(n)]


def _documents(rng: random.Random, n: int) -> list[dict]:
    return [{"text": ". ".join(caption(sample_scene(rng), rng) for _ in range(rng.randint(1, 6)))}
            for _ in range(n)]


def _save_png(folder: str, name: str, img) -> str:
    img.save(os.path.join(folder, name), "PNG")
    return os.path.join(os.path.basename(folder), name)


def _vqa(rng: random.Random, n_images: int, size: int, folder: str, split: str) -> list[dict]:
    entries = []
    for i in range(n_images):
        scene = sample_scene(rng)
        path = _save_png(folder, f"{split}-{i:06d}.png", render(scene, size, rng))
        asked = set()
        for _ in range(10):  # two different questions per image (draws may repeat)
            q, a = question(scene, rng)
            if q not in asked:
                asked.add(q)
                # synthetic annotators agree: 10 identical answers give the full VQA soft score
                entries.append({"qid": len(entries), "image": path, "question": q, "answer": a,
                                "answers": [a] * 10})
            if len(asked) == 2:
                break
    return entries


def _nlvr2(rng: random.Random, n: int, size: int, folder: str, split: str) -> list[dict]:
    entries = []
    for i in range(n):
        left, right = sample_scene(rng), sample_scene(rng)
        want = rng.random() < 0.5  # balance true and false statements
        for _ in range(50):
            sentence, label = statement(left, right, rng)
            if label == want:
                break
        paths = [_save_png(folder, f"{split}-{i:06d}-{side}.png", render(s, size, rng))
                 for side, s in (("left", left), ("right", right))]
        entries.append({"id": i, "images": paths, "sentence": sentence, "label": label})
    return entries


def _complete(out_dir: str, args: dict) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if (manifest.get("format") != FORMAT or manifest.get("args") != args
            or not all(os.path.exists(p) for p in manifest["files"])):
        return None
    return manifest


def make_synthetic(out_dir: str, *, num_pairs: int = 2000, num_images: int | None = None,
                   num_texts: int | None = None, num_val: int = 200, num_retrieval: int = 100,
                   retrieval_captions: int = 2, num_vqa_images: int = 300, num_nlvr2: int = 300,
                   seed: int = 0, image_size: int = 64, vocab_size: int = 1000,
                   samples_per_shard: int = 500, progress: bool = False) -> dict:
    """Generate (or reuse) the dataset in `out_dir` and return its manifest (see module doc)."""
    if vocab_size > 1024:
        raise ValueError("vocab_size must be <= 1024 to fit the tiny model preset")
    num_images = num_pairs // 2 if num_images is None else num_images
    num_texts = num_pairs if num_texts is None else num_texts
    args = dict(num_pairs=num_pairs, num_images=num_images, num_texts=num_texts, num_val=num_val,
                num_retrieval=num_retrieval, retrieval_captions=retrieval_captions,
                num_vqa_images=num_vqa_images, num_nlvr2=num_nlvr2, seed=seed, image_size=image_size,
                vocab_size=vocab_size, samples_per_shard=samples_per_shard)
    out_dir = os.path.abspath(out_dir)
    if (manifest := _complete(out_dir, args)) is not None:
        return manifest
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))  # stale: written again only when complete

    def rng(portion: str) -> random.Random:
        return random.Random(f"{seed}/{portion}")

    portions = {
        ("image_text", "train"): _pairs(rng("pairs-train"), num_pairs, image_size),
        ("image_text", "val"): _pairs(rng("pairs-val"), num_val, image_size),
        ("image", "train"): _images(rng("images-train"), num_images, image_size),
        ("image", "val"): _images(rng("images-val"), num_val, image_size),
        ("text", "train"): _documents(rng("texts-train"), num_texts),
        ("text", "val"): _documents(rng("texts-val"), num_val),
        ("image_text", "retrieval"): _pairs(rng("retrieval"), num_retrieval, image_size, retrieval_captions),
    }
    manifest: dict = {"format": FORMAT, "args": args, "image_size": image_size, "recommended_augment": "light",
                      "files": []}
    for (kind, split), items in portions.items():
        index = pack_shards(items, os.path.join(out_dir, kind if split != "retrieval" else "retrieval"), kind,
                            samples_per_shard=samples_per_shard, prefix=split,
                            key_prefix=f"{kind}-{split}-", progress=progress, mtime=0.0)
        folder = os.path.dirname(index["pattern"])
        manifest["files"] += [os.path.join(folder, s["name"]) for s in index["shards"]]
        manifest.setdefault(kind if split != "retrieval" else "retrieval", {})[
            split if split != "retrieval" else "shards"] = index["pattern"]

    retrieval = portions[("image_text", "retrieval")]
    texts = [c for item in retrieval for c in item["captions"]]
    gold = {"images": [f"image_text-retrieval-{i:09d}" for i in range(len(retrieval))], "texts": texts,
            "img2txt": [list(range(i * retrieval_captions, (i + 1) * retrieval_captions))
                        for i in range(len(retrieval))],
            "txt2img": [i for i in range(len(retrieval)) for _ in range(retrieval_captions)]}
    manifest["retrieval"]["json"] = _write_json(out_dir, "retrieval/retrieval.json", gold, manifest)

    for task, make, count in (("vqa", _vqa, num_vqa_images), ("nlvr2", _nlvr2, num_nlvr2)):
        folder = os.path.join(out_dir, task, "images")
        os.makedirs(folder, exist_ok=True)
        manifest[task] = {}
        for split, n in (("train", count), ("val", max(1, count // 5))):
            entries = make(rng(f"{task}-{split}"), n, image_size, folder, split)
            manifest[task][split] = _write_json(out_dir, f"{task}/{split}.json", entries, manifest)
            manifest[task][f"{split}_shards"] = _pack_task(task, manifest[task][split], split, samples_per_shard,
                                                           progress, manifest)
    vqa_answers = sorted({e["answer"] for s in ("train", "val") for e in _read_json(manifest["vqa"][s])})
    manifest["vqa"]["answers"] = _write_json(out_dir, "vqa/answers.json", vqa_answers, manifest)

    corpus = [c for items in portions.values() for item in items for c in item.get("captions", [])]
    corpus += [item["text"] for (kind, _), items in portions.items() if kind == "text" for item in items]
    corpus += [e["question"] + " " + e["answer"] for e in _read_json(manifest["vqa"]["train"])]
    corpus += [e["sentence"] for e in _read_json(manifest["nlvr2"]["train"])]
    manifest["tokenizer"] = train_sentencepiece(corpus, model_path=os.path.join(out_dir, "tokenizer.model"),
                                                vocab_size=vocab_size, model_type="bpe")
    manifest["files"].append(manifest["tokenizer"])
    manifest["counts"] = {"pairs": num_pairs, "images": num_images, "texts": num_texts, "val": num_val,
                          "retrieval_images": num_retrieval, "retrieval_texts": len(texts),
                          "unique_train_captions": len({i["captions"][0] for i in portions[("image_text", "train")]})}
    manifest["seconds"] = round(time.time() - start, 2)
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    return manifest


def _pack_task(task: str, listing: str, split: str, samples_per_shard: int, progress: bool, manifest: dict) -> str:
    """Shards of kind `task` ("vqa" / "nlvr2") from the split's JSON list, beside it; their pattern."""
    log = SkipLog()
    items = read_vqa(listing, None, None, log) if task == "vqa" else read_nlvr2(listing, None, log)
    if log.problems:
        raise RuntimeError(f"synthetic {task} {split}: {log.problems[0]}")  # a bug here, never bad input
    index = pack_shards(items, os.path.dirname(listing), task, samples_per_shard=samples_per_shard, prefix=split,
                        key_prefix=f"{task}-{split}-", progress=progress, mtime=0.0)
    manifest["files"] += [os.path.join(os.path.dirname(listing), s["name"]) for s in index["shards"]]
    return index["pattern"]


def _write_json(out_dir: str, rel: str, obj, manifest: dict) -> str:
    path = os.path.join(out_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    manifest["files"].append(path)
    return path


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)
