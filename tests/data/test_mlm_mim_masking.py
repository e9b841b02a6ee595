import numpy as np
import pytest

from vlmo_large.data.masking import IGNORE_INDEX, block_mim_mask, whole_word_mlm

SPECIAL = [0, 1, 2, 3, 4]
VOCAB = 100


def _sequence(rng, n_words=30, max_len=64):
    """[CLS] words of 1-3 pieces [SEP] padding; word_starts marks each word's first piece."""
    ids, starts = [2], [True]
    for _ in range(n_words):
        for piece in range(rng.integers(1, 4)):
            ids.append(int(rng.integers(5, VOCAB)))
            starts.append(piece == 0)
    ids.append(3)
    starts.append(True)
    pad = max_len - len(ids)
    return np.array(ids + [0] * pad), np.array(starts + [True] * pad)


def test_whole_words_15_percent_and_80_10_10():
    rng = np.random.default_rng(0)
    outcome = {"mask": 0, "random": 0, "same": 0}
    for trial in range(400):
        ids, starts = _sequence(rng)
        out, labels = whole_word_mlm(ids, starts, rng=np.random.default_rng(trial), mask_id=4,
                                     special_ids=SPECIAL, vocab_size=VOCAB, prob=0.15)
        chosen = labels != IGNORE_INDEX
        real = ~np.isin(ids, SPECIAL)
        assert not (chosen & ~real).any(), "special tokens and padding are never predicted"
        assert abs(chosen.sum() - round(0.15 * real.sum())) <= 2  # whole words may undershoot
        assert (labels[chosen] == ids[chosen]).all()
        assert (out[~chosen] == ids[~chosen]).all()
        # whole words: within a word, all pieces are predicted or none
        word_id = np.cumsum(starts)
        for w in np.unique(word_id[real]):
            in_word = (word_id == w) & real
            assert chosen[in_word].all() or not chosen[in_word].any()
        outcome["mask"] += int((out[chosen] == 4).sum())
        outcome["same"] += int((out[chosen] == ids[chosen]).sum())
        outcome["random"] += int(((out[chosen] != 4) & (out[chosen] != ids[chosen])).sum())
        assert (out[chosen & (out != 4)] >= 5).all(), "random replacements are never special ids"
    total = sum(outcome.values())
    assert abs(outcome["mask"] / total - 0.8) < 0.03
    assert abs(outcome["random"] / total - 0.1) < 0.03  # ~1% of random picks equal the original
    assert abs(outcome["same"] / total - 0.1) < 0.03


@pytest.mark.parametrize("grid,ratio", [(14, 0.4), (4, 0.4), (24, 0.5), (14, 0.0)])
def test_block_mim_mask_exact_count_and_blocky(grid, ratio):
    counts = []
    for seed in range(30):
        mask = block_mim_mask(grid, rng=np.random.default_rng(seed), ratio=ratio)
        assert mask.dtype == bool and mask.shape == (grid * grid,)
        assert mask.sum() == round(ratio * grid * grid)
        counts.append(_neighbour_fraction(mask.reshape(grid, grid)))
    if grid >= 14 and ratio > 0:
        # blocks: a masked patch mostly has a masked 4-neighbour (random scatter would give ~ratio)
        assert np.mean(counts) > 0.85
    assert not np.array_equal(block_mim_mask(grid, rng=np.random.default_rng(1), ratio=0.4),
                              block_mim_mask(grid, rng=np.random.default_rng(2), ratio=0.4))


def _neighbour_fraction(m):
    padded = np.pad(m, 1)
    neigh = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return (neigh & m).sum() / max(m.sum(), 1)
