"""Pack a dataset into webdataset tar shards (plus <prefix>-index.json and a skip report).

    # image-text pairs from a CSV (image,caption[,more columns]) or JSONL ({"image", "caption"|"captions", ...})
    python tools/make_shards.py pairs captions.jsonl --out shards/coco --max-image-side 512
    # the same, holding 1000 images out as a zero-shot retrieval split (eval.retrieval_shards/_json)
    python tools/make_shards.py pairs captions.jsonl --out shards/coco --heldout 1000
    # image-only (stage 1) and text-only (stage 2) corpora
    python tools/make_shards.py images /data/imagenet/train --out shards/in1k
    python tools/make_shards.py text wiki_*.txt --out shards/wiki --documents

Bad table lines and captions (not JSON, no image, a caption that is not a string) are skipped,
counted and listed with their line; a table without the columns it needs stops the tool (exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys

from vlmo_large.data.pair_tables import read_pair_table
from vlmo_large.data.shard_packing import (describe_skips, image_folder_items, image_text_items,
                                           pack_shards, split_heldout, text_file_items)
from vlmo_large.errors import UserError

SHOWN_PROBLEMS = 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["pairs", "images", "text"])
    p.add_argument("inputs", nargs="+", help="pairs: CSV/JSONL table(s); images: folder(s); text: files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-image-side", type=int, default=None, help="downscale larger images (JPEG q95)")
    p.add_argument("--group-captions", action="store_true",
                   help="pairs: one sample per image with all its captions (default: one per caption)")
    p.add_argument("--image-root", default=None, help="pairs: base folder of relative image paths")
    p.add_argument("--heldout", type=int, default=0, metavar="N",
                   help="pairs: hold N random images out (all their captions) as a retrieval split in "
                        "<out>/heldout: shards (one sample per image) and heldout-retrieval.json")
    p.add_argument("--seed", type=int, default=0, help="pairs: which images --heldout picks")
    p.add_argument("--documents", action="store_true", help="text: blank-line separated documents, not lines")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--key-prefix", default="", help="prepended to sample keys (keep keys unique across datasets)")
    return p


def _pairs(args) -> dict:
    rows = None
    for table in args.inputs:
        rows = read_pair_table(table, image_root=args.image_root, out=rows)
    for line in rows.problems[:SHOWN_PROBLEMS]:
        print(f"skipped {line}")
    if len(rows.problems) > SHOWN_PROBLEMS:
        print(f"... and {len(rows.problems) - SHOWN_PROBLEMS} more skipped rows/captions (counts below)")
    common = dict(samples_per_shard=args.samples_per_shard, max_image_side=args.max_image_side,
                  num_procs=args.procs)
    train, heldout = split_heldout(rows, args.heldout, args.seed) if args.heldout else (rows, None)
    index = pack_shards(image_text_items(train, group_captions=args.group_captions), args.out, "image_text",
                        prefix=args.prefix, key_prefix=args.key_prefix, skipped_before=dict(rows.skipped), **common)
    if heldout is not None:
        held = pack_shards(image_text_items(heldout, group_captions=True), os.path.join(args.out, "heldout"),
                           "image_text", prefix="heldout", key_prefix=f"{args.key_prefix}heldout-",
                           retrieval_json=True, **common)
        print(f"held out {held['samples']} images in {len(held['shards'])} shards ({describe_skips(held)}); "
              f"evaluate with: eval.retrieval_shards={held['pattern']} eval.retrieval_json={held['retrieval_json']}")
        index["heldout"] = held
    return index


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        if args.source == "pairs":
            index = _pairs(args)
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
