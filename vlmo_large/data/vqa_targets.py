"""VQA soft-score targets, made per sample by the loader (kind "vqa"), and the answer vocabulary it reads.

The reference VLMo's targets: a question's 10 human answers counted as written; each answer of the
vocabulary gets soft_score(its count), 0 for the others. soft_score(m) = 0, 0.3, 0.6, 0.9, 1 for
m = 0, 1, 2, 3, >= 4 is the official VQA accuracy of an answer m of ten humans gave
(evaluation/vqa_metric.py computes that accuracy; its tests check the two agree). The vocabulary
itself is built by evaluation/vqa_metric.py answer_vocabulary (tools/make_shards.py vqa --answers).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from vlmo_large.data.pair_tables import read_json
from vlmo_large.errors import UserError


def soft_score(count: int) -> float:
    """The reference's target for an answer `count` of the 10 humans gave (= its VQA accuracy)."""
    if count < 0:
        raise ValueError(f"an answer count cannot be negative, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def soft_targets(human_answers: Sequence[str], vocabulary: dict[str, int] | Sequence[str]) -> dict[int, float]:
    """{answer index: soft score} for one question; answers outside the vocabulary are dropped (the
    reference also drops a training question left with none). As the reference, the human answers
    are counted as written (VQA v2's are lowercase already)."""
    index = vocabulary if isinstance(vocabulary, dict) else {answer: i for i, answer in enumerate(vocabulary)}
    counts = Counter(human_answers)
    return {index[answer]: soft_score(count) for answer, count in counts.items() if answer in index}


def target_tensor(targets: Sequence[dict[int, float]], num_answers: int) -> torch.Tensor:
    """[questions, num_answers] float32 rows from soft_targets' dicts (zeros elsewhere)."""
    rows = torch.zeros(len(targets), num_answers)
    for row, scores in enumerate(targets):
        for answer, score in scores.items():
            rows[row, answer] = score
    return rows


def load_answers(answers) -> list[str]:
    """The answer vocabulary: a list of strings, or the path of a JSON file holding one."""
    if isinstance(answers, str):
        answers = read_json(answers, "VQA answer vocabulary")
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError("the VQA answer vocabulary must be a non-empty JSON list of strings "
                        "(tools/make_shards.py vqa ... --answers writes one)")
    if len(set(answers)) != len(answers):
        duplicate = next(a for a, n in Counter(answers).items() if n > 1)
        raise UserError(f"the VQA answer vocabulary lists {duplicate!r} twice")
    return list(answers)
