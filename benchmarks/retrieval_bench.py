"""Retrieval at COCO 5k scale on the CPU: chunked top-k (evaluation/topk_retrieval.py) at several
chunk sizes next to the full-matrix version, on random features.

    python benchmarks/retrieval_bench.py [--images 5000] [--per-image 5] [--dims 256,768]
                                         [--chunks 256x25000,1024x8192,1024x25000,5000x2048] [--rounds 2]

Each row: the top-k lists of both directions (k = 10 + the most gold items: 15 texts per image,
11 images per caption) from one pass over [image chunk x text chunk] blocks, then R@1/5/10. "full
matrix" computes the whole [images, texts] similarity matrix and torch.topk along each axis (its
size is printed; it is what the chunked path never holds). The metrics of every row are checked to
be equal. Times are the best of --rounds (the machine's cores are shared), float32, all cores.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vlmo_large.evaluation.topk_retrieval import GoldPairs, hits_at_k, topk_both_ways


def metrics_from_lists(image_lists, text_lists, gold: GoldPairs) -> dict:
    (tr_scores, tr_texts), (ir_scores, ir_images) = image_lists, text_lists
    tr = hits_at_k(tr_scores, gold.is_gold(torch.arange(tr_texts.shape[0])[:, None].expand_as(tr_texts), tr_texts),
                   (1, 5, 10))
    ir = hits_at_k(ir_scores, gold.is_gold(ir_images, torch.arange(ir_images.shape[0])[:, None].expand_as(ir_images)),
                   (1, 5, 10))
    return {f"{name}_r{k}": round(hits[k].float().mean().item(), 6) for name, hits in (("tr", tr), ("ir", ir))
            for k in (1, 5, 10)}


def full_matrix_lists(images, texts, k_texts: int, k_images: int):
    sims = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    return sims.topk(k_texts, dim=1), sims.T.topk(k_images, dim=1), sims.numel() * 4


def best_time(fn, rounds: int):
    best, out = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--dims", default="256,768")
    parser.add_argument("--chunks", default="256x25000,1024x8192,1024x25000,5000x2048")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-full", action="store_true", help="skip the full-matrix row (memory)")
    args = parser.parse_args()
    n, m = args.images, args.images * args.per_image
    text_to_image = torch.arange(n).repeat_interleave(args.per_image)
    gold = GoldPairs(text_to_image, n)
    k_texts, k_images = 10 + gold.most_gold_texts(), 10 + gold.most_gold_images()
    print(f"{n} images x {m} captions, top-{k_texts} texts per image and top-{k_images} images per caption, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'dim':>4} {'method':<22} {'block MB':>9} {'seconds':>8} {'pairs/s':>10}  R@1 tr/ir")
    for dim in (int(d) for d in args.dims.split(",")):
        g = torch.Generator().manual_seed(dim)
        images = torch.randn(n, dim, generator=g)
        texts = images[text_to_image] + 2.0 * torch.randn(m, dim, generator=g)  # gold captions near their image
        reference = None
        rows = [] if args.no_full else [("full matrix", None)]
        rows += [(f"chunked {c}", tuple(int(x) for x in c.split("x"))) for c in args.chunks.split(",")]
        for name, chunks in rows:
            if chunks is None:
                seconds, (tr, ir, size) = best_time(lambda: full_matrix_lists(images, texts, k_texts, k_images),
                                                    args.rounds)
                lists = (tuple(tr), tuple(ir))
            else:
                seconds, lists = best_time(lambda: topk_both_ways(images, texts, k_texts, k_images, *chunks),
                                           args.rounds)
                size = min(chunks[0], n) * min(chunks[1], m) * 4
            metrics = metrics_from_lists(*lists, gold)
            reference = reference or metrics
            assert metrics == reference, f"{name}: {metrics} != {reference}"
            print(f"{dim:>4} {name:<22} {size / 2**20:>9.0f} {seconds:>8.2f} {n * m / seconds:>10.3g}  "
                  f"{metrics['tr_r1']:.3f}/{metrics['ir_r1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
