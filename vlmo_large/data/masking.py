"""Masking for the pretraining objectives: whole-word MLM on text, block-wise MIM on patches.

Both take a numpy Generator so that a sample's masks depend only on its seed (see sample_stream),
which keeps a resumed stream bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math

import numpy as np

IGNORE_INDEX = -100


def mlm_budget(tokens: int, prob: float) -> int:
    """How many of `tokens` maskable positions whole_word_mlm predicts (before rounding to whole words)."""
    return max(1, int(round(prob * tokens)))


def max_masked_tokens(seq_len: int, prob: float) -> int:
    """A hard per-sequence cap on whole_word_mlm's predicted positions for padded length `seq_len`:
    the loss gathers exactly this many slots per row (a static shape, no host sync on a GPU)."""
    return mlm_budget(seq_len, prob)


def whole_word_mlm(ids: np.ndarray, word_starts: np.ndarray, *, rng: np.random.Generator,
                   mask_id: int, special_ids, vocab_size: int, prob: float = 0.15,
                   mask_frac: float = 0.8, random_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """BERT whole-word masking of one padded sequence.

    Words (a start piece and its continuation pieces; special tokens never) are drawn in random
    order until round(prob * real tokens) positions are chosen, never splitting a word (as in
    BERT's create_pretraining_data). If every word is longer than that, the shortest word is taken,
    cut to max_masked_tokens(len(ids), prob) pieces: the cap the loss's fixed slot count relies on.
    Each chosen position becomes [MASK] (80%), a random non-special
    id (10%) or stays (10%). Returns (mlm_ids, labels) with labels = -100 where not predicted.
    """
    ids = np.asarray(ids, dtype=np.int64)
    special = np.isin(ids, list(special_ids))
    candidates = np.flatnonzero(~special)
    labels = np.full_like(ids, IGNORE_INDEX)
    out = ids.copy()
    if candidates.size == 0:
        return out, labels
    # group candidate positions into words: a word starts at a word-start piece or after a special
    words: list[list[int]] = []
    prev = -2
    for pos in candidates:
        if word_starts[pos] or pos != prev + 1 or not words:
            words.append([int(pos)])
        else:
            words[-1].append(int(pos))
        prev = pos
    budget = mlm_budget(candidates.size, prob)
    chosen: list[int] = []
    for w in rng.permutation(len(words)):
        if len(chosen) >= budget:
            break
        if len(chosen) + len(words[w]) > budget:
            continue
        chosen.extend(words[w])
    if not chosen:  # every word longer than the budget: take the shortest one whole
        chosen = min(words, key=len)[:max_masked_tokens(ids.size, prob)]
    chosen_arr = np.array(sorted(chosen), dtype=np.int64)
    labels[chosen_arr] = ids[chosen_arr]
    u = rng.random(chosen_arr.size)
    n_special = max(special_ids) + 1
    replace_mask = chosen_arr[u < mask_frac]
    replace_rand = chosen_arr[(u >= mask_frac) & (u < mask_frac + random_frac)]
    out[replace_mask] = mask_id
    out[replace_rand] = rng.integers(n_special, vocab_size, size=replace_rand.size)
    return out, labels


def block_mim_mask(grid: int, *, rng: np.random.Generator, ratio: float = 0.4,
                   min_block: int = 4, aspect: float = 0.3) -> np.ndarray:
    """BEiT-style block-wise mask over a grid x grid patch layout, flattened row-major.

    Rectangles of at least `min_block` patches with aspect ratio in [aspect, 1/aspect] (log-uniform)
    are placed until exactly round(ratio * grid^2) patches are masked; when blocks no longer fit,
    the remainder is filled with random unmasked patches so the count is always exact.
    """
    n = grid * grid
    target = int(round(ratio * n))
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(aspect), math.log(1 / aspect))
    for _attempt in range(10 * n):
        left = target - int(mask.sum())
        if left < min(min_block, target) or left <= 0:
            break
        area = rng.uniform(min(min_block, left), left)
        ar = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * ar)))
        w = int(round(math.sqrt(area / ar)))
        if not (1 <= h <= grid and 1 <= w <= grid):
            continue
        top, lft = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        block = mask[top:top + h, lft:lft + w]
        new = int((~block).sum())
        if 0 < new <= left:
            block[:] = True
    flat = mask.reshape(-1)
    left = target - int(flat.sum())
    if left > 0:
        flat[rng.choice(np.flatnonzero(~flat), size=left, replace=False)] = True
    return flat
