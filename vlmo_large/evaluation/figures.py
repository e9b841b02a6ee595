"""A retrieval-examples figure: a few query images, each with its top captions, gold marked.

    image_feats, text_feats = encode_for_retrieval(model, batch["image"], batch["text_ids"], batch["text_mask"])
    fig = retrieval_examples_figure(batch["image"], captions, image_feats, text_feats, range(len(captions)))
    tracker.log_figure(fig, f"retrieval_examples_step{step:07d}")
"""
from __future__ import annotations

import textwrap
from typing import Sequence

import torch
# A bare Figure (no pyplot): renders with the Agg canvas, needs no display, and is not kept alive
# by pyplot's global figure list (which would leak one figure per evaluation in a long run).
from matplotlib.figure import Figure

from vlmo_large.evaluation.retrieval import similarities, text_retrieval_ranks, top_texts

GOLD, OTHER, MISSED = "#1a7f37", "#222222", "#9a6700"


def denormalize(image: torch.Tensor, mean: float = 0.5, std: float = 0.5):
    """[3, H, W] normalised with the pretraining transform -> [H, W, 3] numpy array in [0, 1]."""
    return (image.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def retrieval_examples_figure(images: torch.Tensor, captions: Sequence[str], image_feats: torch.Tensor,
                              text_feats: torch.Tensor, text_to_image, num_examples: int = 4,
                              top_k: int = 3, wrap: int = 60):
    """Rows of (image, its `top_k` retrieved captions with cosine scores); gold captions in green
    with a check mark. When no gold caption made the top k, the best gold one and its rank follow
    in amber. Returns a matplotlib Figure (`fig.savefig(path)` or `tracker.log_figure(fig, name)`)."""
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    if len(captions) != text_feats.shape[0] or text_to_image.shape[0] != len(captions):
        raise ValueError("captions, text_feats and text_to_image must describe the same texts")
    shown = min(num_examples, images.shape[0])
    scores, picked = top_texts(image_feats[:shown], text_feats, top_k)
    gold_ranks = text_retrieval_ranks(image_feats, text_feats, text_to_image.to(image_feats.device))
    sims = similarities(image_feats[:shown], text_feats)

    fig = Figure(figsize=(10, 2.3 * shown))
    axes = fig.subplots(shown, 2, squeeze=False, gridspec_kw={"width_ratios": [1, 3.2]})
    for row in range(shown):
        image_ax, text_ax = axes[row]
        image_ax.imshow(denormalize(images[row]))
        image_ax.set_axis_off()
        image_ax.set_title(f"image {row}", fontsize=8)
        text_ax.set_axis_off()
        lines = []
        for place, (score, j) in enumerate(zip(scores[row].tolist(), picked[row].tolist()), 1):
            is_gold = int(text_to_image[j]) == row
            mark = "\u2713 " if is_gold else ""
            lines.append((f"{place}. {mark}({score:.2f}) {_short(captions[j], wrap)}", GOLD if is_gold else OTHER))
        if gold_ranks[row] >= top_k:
            golds = (text_to_image == row).nonzero().flatten()
            best = golds[sims[row, golds.to(sims.device)].argmax().item()].item()
            lines.append((f"gold at rank {int(gold_ranks[row]) + 1}: {_short(captions[best], wrap)}", MISSED))
        for n, (text, color) in enumerate(lines):
            text_ax.text(0.0, 0.92 - n * 0.24, text, color=color, fontsize=9, va="top",
                         transform=text_ax.transAxes, family="DejaVu Sans")
    fig.suptitle(f"Text retrieval: top {top_k} captions per image", fontsize=10)
    fig.tight_layout()
    return fig


def _short(text: str, width: int) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")
