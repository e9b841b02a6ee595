"""Generate the built-in synthetic image-text dataset (see vlmo_large/data/synthetic.py).

    python tools/make_synthetic.py runs/synth --num-pairs 2000 --image-size 64
"""
from __future__ import annotations

import argparse
import json

from vlmo_large.data.synthetic import make_synthetic


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--num-pairs", type=int, default=2000)
    p.add_argument("--num-images", type=int, default=None, help="image-only samples (default pairs/2)")
    p.add_argument("--num-texts", type=int, default=None, help="text-only samples (default pairs)")
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--num-retrieval", type=int, default=100)
    p.add_argument("--num-vqa-images", type=int, default=300)
    p.add_argument("--num-nlvr2", type=int, default=300)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    manifest = make_synthetic(a.out_dir, num_pairs=a.num_pairs, num_images=a.num_images, num_texts=a.num_texts,
                              num_val=a.num_val, num_retrieval=a.num_retrieval, num_vqa_images=a.num_vqa_images,
                              num_nlvr2=a.num_nlvr2, seed=a.seed, image_size=a.image_size,
                              vocab_size=a.vocab_size, samples_per_shard=a.samples_per_shard, progress=True)
    print(json.dumps({k: manifest[k] for k in ("counts", "seconds", "tokenizer")}, indent=1))
    return manifest


if __name__ == "__main__":
    main()
