"""The retrieval-examples figure shows the right captions in the right order, marks gold ones, and
draws the images denormalised."""
import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from vlmo_large.evaluation.figures import GOLD, MISSED, OTHER, denormalize, retrieval_examples_figure


def case():
    # Image i's feature is e_i. Cosines, by hand (rows images, columns captions 0..4):
    #   image 0: .894 .169 0    0    0      gold {0}:    top 2 = 0 (gold), 1
    #   image 1: .447 .507 0    .099 .287   gold {1, 4}: top 2 = 1 (gold), 0
    #   image 2: 0    .845 .981 .990 0      gold {2, 3}: top 2 = 3, 2 (both gold)
    image_feats = torch.eye(3, 4)
    text_feats = torch.tensor([[1.0, 0.5, 0, 0], [0.2, 0.6, 1, 0], [0, 0, 1, 0.2], [0, 0.1, 1, 0.1], [0, 0.3, 0, 1]])
    text_to_image = [0, 1, 2, 2, 1]
    captions = [f"caption {j}" for j in range(5)]
    pixels = torch.linspace(-1, 1, 3 * 3 * 8 * 8).reshape(3, 3, 8, 8)
    return pixels, captions, image_feats, text_feats, text_to_image


def lines(fig):
    text_axes = fig.axes[1::2]
    return [[(t.get_text(), mcolors.to_hex(t.get_color())) for t in ax.texts] for ax in text_axes]


def test_top_captions_in_order_with_gold_marked():
    pixels, captions, image_feats, text_feats, gold = case()
    fig = retrieval_examples_figure(pixels, captions, image_feats, text_feats, gold, num_examples=3, top_k=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    rows = lines(fig)
    assert [(text.split(") ")[1], color) for text, color in rows[0]] == [("caption 0", GOLD), ("caption 1", OTHER)]
    assert rows[0][0][0].startswith("1. \u2713 (0.89)")
    assert [(text.split(") ")[1], color) for text, color in rows[1]] == [("caption 1", GOLD), ("caption 0", OTHER)]
    assert [(text.split(") ")[1], color) for text, color in rows[2]] == [("caption 3", GOLD), ("caption 2", GOLD)]


def test_missed_gold_is_shown_with_its_rank():
    pixels, captions, image_feats, text_feats, gold = case()
    gold = [0, 2, 2, 1, 0]  # image 1's only caption is now caption 3 (.099): three captions beat it
    fig = retrieval_examples_figure(pixels, captions, image_feats, text_feats, gold, num_examples=2, top_k=1)
    last_text, last_color = lines(fig)[1][-1]
    assert last_color == MISSED and last_text == "gold at rank 4: caption 3"


def test_images_are_denormalised_and_figure_renders(tmp_path):
    pixels, captions, image_feats, text_feats, gold = case()
    fig = retrieval_examples_figure(pixels, captions, image_feats, text_feats, gold, num_examples=2)
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(shown, (pixels[0].permute(1, 2, 0) * 0.5 + 0.5).numpy())
    assert denormalize(torch.full((3, 2, 2), -3.0)).min() == 0.0  # clamped
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_mismatched_inputs_are_refused():
    pixels, captions, image_feats, text_feats, gold = case()
    with pytest.raises(ValueError):
        retrieval_examples_figure(pixels, captions[:3], image_feats, text_feats, gold)
