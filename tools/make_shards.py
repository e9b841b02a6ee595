"""Pack a dataset into webdataset tar shards (plus <prefix>-index.json and a skip report).

    # image-text pairs from a CSV (image,caption[,more columns]) or JSONL ({"image", "caption"|"captions", ...})
    python tools/make_shards.py pairs captions.jsonl --out shards/coco --max-image-side 512
    # the same, holding 1000 images out as a zero-shot retrieval split (eval.retrieval_shards/_json)
    python tools/make_shards.py pairs captions.jsonl --out shards/coco --heldout 1000
    # image-only (stage 1) and text-only (stage 2) corpora
    python tools/make_shards.py images /data/imagenet/train --out shards/in1k
    python tools/make_shards.py text wiki_*.txt --out shards/wiki --documents
    # fine-tuning sets. VQA v2 (questions + annotations + COCO images; --answers also writes the answer
    # vocabulary <out>/<prefix>-answers.json; --answers-from adds val's majority answers, as the reference)
    python tools/make_shards.py vqa v2_OpenEnded_mscoco_train2014_questions.json \
        --annotations v2_mscoco_train2014_annotations.json --image-root coco --out shards/vqa/train \
        --answers --answers-from v2_mscoco_val2014_annotations.json
    python tools/make_shards.py vqa v2_OpenEnded_mscoco_test-dev2015_questions.json --image-root coco \
        --out shards/vqa/test-dev                                     # no annotations: no answers
    python tools/make_shards.py vqa runs/synth/vqa/train.json --out shards/synth_vqa --answers  # synthetic list
    # NLVR2 JSON lines + images/<split> (or the synthetic nlvr2/<split>.json)
    python tools/make_shards.py nlvr2 nlvr2/data/train.json --image-root nlvr2/images/train --out shards/nlvr2/train
    # Karpathy splits: <out>/train (train + restval, one sample per caption), <out>/val and <out>/test
    # (held-out retrieval: one sample per image with all captions + <split>-retrieval.json)
    python tools/make_shards.py karpathy dataset_coco.json --image-root coco --out shards/coco_karpathy

Bad table lines, entries and captions (not JSON, no image, a caption that is not a string, a question
without answers, a label other than True/False, a missing image file) are skipped, counted and listed
with their line or entry; an input without the columns or structure it needs stops the tool (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vlmo_large.data.karpathy_tables import read_karpathy
from vlmo_large.data.nlvr2_tables import read_nlvr2
from vlmo_large.data.pair_tables import SkipLog, read_json, read_pair_table
from vlmo_large.data.shard_packing import (describe_skips, image_folder_items, image_text_items,
                                           pack_shards, split_heldout, text_file_items)
from vlmo_large.data.vqa_tables import read_vqa
from vlmo_large.errors import UserError
from vlmo_large.evaluation.vqa_metric import answer_vocabulary

SHOWN_PROBLEMS = 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["pairs", "images", "text", "vqa", "nlvr2", "karpathy"])
    p.add_argument("inputs", nargs="+", help="pairs: CSV/JSONL table(s); images: folder(s); text: files; vqa: "
                                             "questions JSON(s) or synthetic lists; nlvr2: JSONL file(s) or "
                                             "synthetic lists; karpathy: dataset_<name>.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-image-side", type=int, default=None, help="downscale larger images (JPEG q95)")
    p.add_argument("--group-captions", action="store_true",
                   help="pairs: one sample per image with all its captions (default: one per caption)")
    p.add_argument("--image-root", default=None,
                   help="pairs: base folder of relative image paths; vqa: the COCO image folder; nlvr2: the "
                        "split's image folder (images/<split>); karpathy: the folder filepath/filename are in")
    p.add_argument("--annotations", action="append", default=[], metavar="JSON",
                   help="vqa: the annotations of each questions file, in the same order (none for a test split)")
    p.add_argument("--answers", action="store_true",
                   help="vqa: also write the answer vocabulary (majority answers occurring at least "
                        "--answers-min-count times) as <out>/<prefix>-answers.json")
    p.add_argument("--answers-from", action="append", default=[], metavar="JSON",
                   help="vqa --answers: more annotation files (or synthetic lists) whose majority answers count")
    p.add_argument("--answers-min-count", type=int, default=9)
    p.add_argument("--no-restval", action="store_true", help="karpathy: train on 'train' only, not 'restval' too")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="pairs: hold N random images out (all their captions) as a retrieval split in "
                        "<out>/heldout: shards (one sample per image) and heldout-retrieval.json")
    p.add_argument("--seed", type=int, default=0, help="pairs: which images --heldout picks")
    p.add_argument("--documents", action="store_true", help="text: blank-line separated documents, not lines")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--key-prefix", default="", help="prepended to sample keys (keep keys unique across datasets)")
    return p


def _report(log: SkipLog) -> None:
    for line in log.problems[:SHOWN_PROBLEMS]:
        print(f"skipped {line}")
    if len(log.problems) > SHOWN_PROBLEMS:
        print(f"... and {len(log.problems) - SHOWN_PROBLEMS} more skipped rows/captions (counts below)")


def _common(args) -> dict:
    return dict(samples_per_shard=args.samples_per_shard, max_image_side=args.max_image_side, num_procs=args.procs)


def _print_heldout(what: str, held: dict) -> None:
    print(f"{what}: {held['samples']} images in {len(held['shards'])} shards ({describe_skips(held)}); "
          f"evaluate with: eval.retrieval_shards={held['pattern']} eval.retrieval_json={held['retrieval_json']}")


def _pairs(args) -> dict:
    rows = None
    for table in args.inputs:
        rows = read_pair_table(table, image_root=args.image_root, out=rows)
    _report(rows)
    common = _common(args)
    train, heldout = split_heldout(rows, args.heldout, args.seed) if args.heldout else (rows, None)
    index = pack_shards(image_text_items(train, group_captions=args.group_captions), args.out, "image_text",
                        prefix=args.prefix, key_prefix=args.key_prefix, skipped_before=dict(rows.skipped), **common)
    if heldout is not None:
        held = pack_shards(image_text_items(heldout, group_captions=True), os.path.join(args.out, "heldout"),
                           "image_text", prefix="heldout", key_prefix=f"{args.key_prefix}heldout-",
                           retrieval_json=True, **common)
        _print_heldout("held out", held)
        index["heldout"] = held
    return index


def _majority_answers(path: str) -> list:
    """The majority answers of an annotations file ("multiple_choice_answer") or a synthetic list ("answer")."""
    data = read_json(path, "VQA annotations file")
    entries = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise UserError(f"{path}: neither a VQA annotations file nor a synthetic question list")
    return [e.get("multiple_choice_answer", e.get("answer")) for e in entries if isinstance(e, dict)]


def _vqa(args) -> dict:
    if args.annotations and len(args.annotations) != len(args.inputs):
        raise UserError(f"--annotations given {len(args.annotations)} times for {len(args.inputs)} questions "
                        "files: give one per questions file, in the same order (none for a test split)")
    log, items = SkipLog(), []
    for n, path in enumerate(args.inputs):
        items += read_vqa(path, args.annotations[n] if args.annotations else None, args.image_root, log)
    _report(log)
    vocabulary = None
    if args.answers:  # before packing: an empty vocabulary stops the tool with nothing written
        majority = [it["majority"] for it in items] + [a for p in args.answers_from for a in _majority_answers(p)]
        vocabulary = answer_vocabulary([a for a in majority if isinstance(a, str)], args.answers_min_count)
        if not vocabulary:
            raise UserError(f"no majority answer occurs {args.answers_min_count} times: the answer vocabulary "
                            "would be empty (annotations given? lower --answers-min-count)")
    index = pack_shards(items, args.out, "vqa", prefix=args.prefix, key_prefix=args.key_prefix,
                        skipped_before=dict(log.skipped), **_common(args))
    if vocabulary is not None:
        index["answers"] = os.path.join(args.out, f"{args.prefix}-answers.json")
        with open(index["answers"], "w", encoding="utf-8") as f:
            json.dump(vocabulary, f, ensure_ascii=False)
        print(f"answer vocabulary: {len(vocabulary)} answers in {index['answers']} (task.answers)")
    return index


def _nlvr2(args) -> dict:
    log, items = SkipLog(), []
    for path in args.inputs:
        items += read_nlvr2(path, args.image_root, log)
    _report(log)
    return pack_shards(items, args.out, "nlvr2", prefix=args.prefix, key_prefix=args.key_prefix,
                       skipped_before=dict(log.skipped), **_common(args))


def _karpathy(args) -> dict:
    if len(args.inputs) != 1:
        raise UserError("karpathy takes one dataset_<name>.json")
    path = args.inputs[0]
    splits, log = read_karpathy(path, args.image_root or os.path.dirname(os.path.abspath(path)))
    _report(log)
    train = splits["train"]
    if not args.no_restval:
        train.rows += splits["restval"].rows
    index = pack_shards(image_text_items(train, group_captions=args.group_captions), os.path.join(args.out, "train"),
                        "image_text", prefix="train", key_prefix=f"{args.key_prefix}train-",
                        skipped_before=dict(log.skipped), **_common(args))
    for split in ("val", "test"):
        if not splits[split].rows:
            continue
        held = pack_shards(image_text_items(splits[split], group_captions=True), os.path.join(args.out, split),
                           "image_text", prefix=split, key_prefix=f"{args.key_prefix}{split}-",
                           retrieval_json=True, **_common(args))
        _print_heldout(split, held)
        index[split] = held
    return index


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        readers = {"pairs": _pairs, "vqa": _vqa, "nlvr2": _nlvr2, "karpathy": _karpathy}
        if args.source in readers:
            index = readers[args.source](args)
        else:
            if args.source == "images":
                kind, items = "image", [it for d in args.inputs for it in image_folder_items(d)]
            else:
                kind, items = "text", text_file_items(args.inputs, documents=args.documents)
            index = pack_shards(items, args.out, kind, samples_per_shard=args.samples_per_shard,
                                max_image_side=args.max_image_side, num_procs=args.procs, prefix=args.prefix,
                                key_prefix=args.key_prefix)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shards: {index['pattern']}")
    print(describe_skips(index))
    return index


if __name__ == "__main__":
    main()
