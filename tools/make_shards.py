"""Pack a dataset into webdataset tar shards (plus <prefix>-index.json and a skip report).

    # image-text pairs from a CSV (image,caption) or JSONL ({"image", "caption"|"captions"})
    python tools/make_shards.py pairs captions.jsonl --out shards/coco --max-image-side 512
    # image-only (stage 1) and text-only (stage 2) corpora
    python tools/make_shards.py images /data/imagenet/train --out shards/in1k
    python tools/make_shards.py text wiki_*.txt --out shards/wiki --documents
"""
from __future__ import annotations

import argparse
import os

from vlmo_large.data.shard_packing import (describe_skips, image_folder_items, image_text_items,
                                           pack_shards, text_file_items)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["pairs", "images", "text"])
    p.add_argument("inputs", nargs="+", help="pairs: CSV/JSONL table(s); images: folder(s); text: files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-image-side", type=int, default=None, help="downscale larger images (JPEG q95)")
    p.add_argument("--group-captions", action="store_true",
                   help="pairs: one sample per image with all its captions (default: one per caption)")
    p.add_argument("--image-root", default=None, help="pairs: base folder of relative image paths")
    p.add_argument("--documents", action="store_true", help="text: blank-line separated documents, not lines")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--key-prefix", default="", help="prepended to sample keys (keep keys unique across datasets)")
    args = p.parse_args(argv)
    if args.source == "pairs":
        kind = "image_text"
        items = [it for t in args.inputs
                 for it in image_text_items(t, group_captions=args.group_captions, image_root=args.image_root)]
    elif args.source == "images":
        kind, items = "image", [it for d in args.inputs for it in image_folder_items(d)]
    else:
        kind, items = "text", text_file_items(args.inputs, documents=args.documents)
    index = pack_shards(items, args.out, kind, samples_per_shard=args.samples_per_shard,
                        max_image_side=args.max_image_side, num_procs=args.procs, prefix=args.prefix,
                        key_prefix=args.key_prefix)
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shards: {index['pattern']}")
    print(describe_skips(index))
    return index


if __name__ == "__main__":
    main()
