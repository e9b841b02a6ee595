"""The VQA metric against hand-worked examples: each normalisation rule of the official evaluation,
the leave-one-out accuracy computed by hand, the reference's vocabulary, soft scores and loss."""
import math

import pytest
import torch

from vlmo_large.data.vqa_targets import soft_score, soft_targets, target_tensor
from vlmo_large.evaluation.vqa_metric import (CONTRACTIONS, answer_vocabulary, mean_vqa_accuracy, normalize_answer,
                                              soft_score_loss, vqa_accuracy)


@pytest.mark.parametrize("raw, normalised", [
    ("Yes.", "yes"),                        # lowercase, a final period dropped
    ("3.5", "3.5"),                         # a period before a digit stays
    ("two dogs!", "2 dogs"),                # number word -> digit, '!' -> space, spaces collapsed
    ("None", "0"),                          # 'none' is a number word too
    ("the red-white flag", "red white flag"),  # article dropped, '-' between letters -> space
    ("An apple", "apple"),
    ("100,978", "100978"),                  # comma between digits: deleted, no space
    ("1,000-2,000", "10002000"),            # ...and then every punctuation mark is deleted
    ("x -y-z", "x yz"),                     # a mark touching a space is deleted everywhere
    ("2:50 pm", "2:50 pm"),                 # colon kept (times)
    ("girl's", "girl's"),                   # apostrophe kept (possessives)
    ("dont", "don't"),                      # a contraction gets its apostrophe back
    ("Couldnt've", "couldn't've"),          # either missing apostrophe of a double contraction
    ("couldn'tve", "couldn't've"),
    ("lets", "lets"),                       # a plain word is not a contraction
    ("a\tblue\ncar ", "blue car"),          # tabs and newlines are spaces
    ("#1", "#1"),                           # '#' is not in the punctuation list
])
def test_normalisation_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_contraction_table_spellings():
    assert CONTRACTIONS["yall'll"] == CONTRACTIONS["y'allll"] == "y'all'll"
    assert CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["oclock"] == "o'clock"
    assert "she'd" not in CONTRACTIONS.values() and "shed" not in CONTRACTIONS  # 'shed' is a word


def test_accuracy_leave_one_out_by_hand():
    # 3 humans, 2 said yes: leaving out a 'yes' leaves 1 match (1/3), leaving out the 'no' leaves 2 (2/3)
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # 10 humans, the answer given by 3 after normalisation ('2', 'two', '2.'): 3 x 2/3 + 7 x 1, over 10
    humans = ["2", "two", "2.", "3", "3", "3", "4", "4", "4", "5"]
    assert vqa_accuracy("Two", humans) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("3", humans) == pytest.approx(0.9)
    assert vqa_accuracy("5", humans) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("six", humans) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


def test_soft_score_is_the_accuracy_of_a_count_of_ten():
    for count in range(11):
        humans = ["a cat"] * count + [f"other {i}" for i in range(10 - count)]
        assert soft_score(count) == pytest.approx(vqa_accuracy("cat", humans))
    assert [soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    with pytest.raises(ValueError):
        soft_score(-1)


def test_mean_accuracy_and_missing_predictions():
    humans = {1: ["yes"] * 10, 2: ["no"] * 9 + ["yes"]}
    assert mean_vqa_accuracy({1: "yes", 2: "yes"}, humans) == pytest.approx((1.0 + 0.3) / 2)
    with pytest.raises(ValueError, match="no prediction"):
        mean_vqa_accuracy({1: "yes"}, humans)


def test_vocabulary_threshold_order_and_normalisation():
    majority = ["Yes."] * 2 + ["yes"] + ["two"] * 2 + ["2"] + ["no"] * 2 + ["blue"]
    # normalised: yes x3 (first), 2 x3, no x2, blue x1; order of first occurrence
    assert answer_vocabulary(majority, min_count=3) == ["yes", "2"]
    assert answer_vocabulary(majority, min_count=1) == ["yes", "2", "no", "blue"]


def test_soft_targets_tensor_and_loss_by_hand():
    vocabulary = ["yes", "no", "2"]
    targets = soft_targets(["yes"] * 6 + ["no"] * 3 + ["maybe"], vocabulary)
    assert targets == {0: 1.0, 1: 0.9}  # 'maybe' is outside the vocabulary
    assert soft_targets(["2", "2"], {"yes": 0, "2": 2}) == {2: 0.6}
    rows = target_tensor([targets, {}], 3)
    assert torch.equal(rows, torch.tensor([[1.0, 0.9, 0.0], [0.0, 0.0, 0.0]]))
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]])
    # BCE(x, t) = log(1 + e^x) - t x; summed over the 3 answers, averaged over the 2 questions
    row0 = 3 * math.log(2.0)
    row1 = math.log(4.0) + 2 * math.log(2.0)
    expected = sum(math.log1p(math.exp(x)) - t * x for x, t in zip(logits.flatten().tolist(),
                                                                   rows.flatten().tolist())) / 2
    assert expected == pytest.approx((row0 + row1) / 2)
    assert soft_score_loss(logits, rows).item() == pytest.approx(expected, rel=1e-6)
