"""VQA v2: the official answer normalisation and accuracy, and the reference VLMo's answer
vocabulary and soft-score targets (docs/MODEL.md section 8).

Normalisation (the official evaluation's documented steps, applied to predictions and human answers):
newlines and tabs become spaces; punctuation other than the apostrophe, the colon and the period
becomes a space (a comma between digits is dropped: "100,978" -> "100978"); a period is dropped
unless a digit follows ("3.5" stays); lowercase; number words -> digits ("none" and "zero" -> 0, up
to "ten"); articles a/an/the removed; a contraction written without its apostrophe gets it back
("dont" -> "don't"); single spaces.

Two details follow the official script's behaviour rather than the page's wording: a punctuation
mark that touches a space anywhere in the answer, or any punctuation in an answer holding a
digit-comma-digit, is deleted instead of spaced ("x -y-z" -> "x yz"); and the contraction table
(CONTRACTIONS) holds exactly the forms the official table restores. Unlike the official script,
the answers are normalised even when all ten humans agree (it skips that case; with answers
taken from a normalised vocabulary this changes nothing).

Accuracy of an answer against N human answers: min(#humans who gave it / 3, 1), averaged over the
N leave-one-out subsets of N-1 humans (the official "10 choose 9" average). With 10 humans of whom
m gave the answer this is 0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >= 4: the reference's soft
score, the training target the loader makes (data/vqa_targets.py soft_score), is that same function
of the count.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # spaced or deleted; the apostrophe, colon and period are not here
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# The contracted forms the official evaluation restores. Each is restored from every spelling that
# lacks exactly one of its apostrophes ("couldnt've" and "couldn'tve" -> "couldn't've"; "dont" ->
# "don't"). Forms that are also plain words without the apostrophe (she'd, we'd, i'll, lets...)
# are not in the official table, so not here.
CONTRACTED_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've", "shouldn't",
    "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll",
    "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's",
    "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't",
    "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll",
    "you're", "you've",
)


def _one_apostrophe_missing(form: str) -> list[str]:
    return [form[:i] + form[i + 1:] for i, char in enumerate(form) if char == "'"]


CONTRACTIONS = {spelling: form for form in CONTRACTED_FORMS for spelling in _one_apostrophe_missing(form)}


def _punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark in text:
            touches_space = f"{mark} " in text or f" {mark}" in text
            text = text.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text)


def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer (module docstring)."""
    text = _punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer against the question's human answers (10 in
    VQA v2): min(matches among the other humans / 3, 1), averaged over leaving each human out."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == predicted for answer in human_answers)
    total = 0.0
    for answer in human_answers:  # leave this human out: the others' matches
        others = matches - (normalize_answer(answer) == predicted)
        total += min(others / 3, 1.0)
    return total / len(human_answers)


def mean_vqa_accuracy(predictions: dict, human_answers: dict) -> float:
    """Mean accuracy over questions: `predictions` {question_id: answer}, `human_answers`
    {question_id: [answers]}; every annotated question needs a prediction."""
    missing = human_answers.keys() - predictions.keys()
    if missing:
        raise ValueError(f"{len(missing)} annotated question(s) have no prediction, e.g. {sorted(missing)[0]!r}")
    if not human_answers:
        raise ValueError("no annotated questions")
    return sum(vqa_accuracy(predictions[q], answers) for q, answers in human_answers.items()) / len(human_answers)


def answer_vocabulary(majority_answers: Iterable[str], min_count: int = 9) -> list[str]:
    """The reference's answer list: each question's majority answer ('multiple_choice_answer' of
    the training annotations), normalised, kept when it occurs at least `min_count` times; in order
    of first occurrence (the classifier's row order)."""
    counts = Counter(normalize_answer(answer) for answer in majority_answers)
    return [answer for answer, count in counts.items() if count >= min_count]


def soft_score_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference's VQA loss: binary cross-entropy with logits, averaged over every element, times
    the number of answers (so a sum over answers, averaged over questions)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
