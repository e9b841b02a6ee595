import json
import os
import random

import numpy as np
from PIL import Image

from conftest import SMALL, tar_records
from vlmo_large.data.synthetic import make_synthetic
from vlmo_large.data.synthetic_scenes import (CELLS, COLOURS, Obj, Scene, caption, question, render,
                                              sample_scene, statement)


def test_manifest_contents(synthetic, tokenizer):
    assert all(os.path.exists(p) for p in synthetic["files"])
    for kind in ("image_text", "image", "text"):
        assert set(synthetic[kind]) == {"train", "val"}
    counts = {}
    for kind, n in (("image_text", 240), ("image", 120), ("text", 120)):
        folder = os.path.dirname(synthetic[kind]["train"])
        recs = {}
        for name in sorted(os.listdir(folder)):
            if name.startswith("train-") and name.endswith(".tar"):
                recs.update(tar_records(os.path.join(folder, name)))
        assert len(recs) == n
        counts[kind] = recs
    caps = [r["txt"].decode() for r in counts["image_text"].values()]
    assert len(set(caps)) > 0.9 * len(caps), "captions are mostly unique"
    assert tokenizer.vocab_size <= 1024
    assert all(tokenizer.unk_id not in tokenizer.encode(c, 64)[0] for c in caps)
    gold = json.load(open(synthetic["retrieval"]["json"]))
    assert len(gold["images"]) == 10 and len(gold["texts"]) == 20
    ret = tar_records(synthetic["retrieval"]["shards"].replace("{000000..000000}", "000000"))
    for i, key in enumerate(gold["images"]):
        assert json.loads(ret[key]["json"])["captions"] == [gold["texts"][t] for t in gold["img2txt"][i]]
        assert all(gold["txt2img"][t] == i for t in gold["img2txt"][i])
    vqa = json.load(open(synthetic["vqa"]["train"]))
    nlvr = json.load(open(synthetic["nlvr2"]["train"]))
    assert len(vqa) == 40 and len(nlvr) == 20 and {e["label"] for e in nlvr} == {True, False}
    root = os.path.dirname(synthetic["nlvr2"]["train"])
    assert Image.open(os.path.join(root, nlvr[0]["images"][1])).size == (64, 64)
    assert set(e["answer"] for e in vqa) <= set(json.load(open(synthetic["vqa"]["answers"])))


def test_deterministic_and_reused(tmp_path, synthetic):
    again = make_synthetic(os.path.dirname(synthetic["tokenizer"]), **SMALL)
    assert again == synthetic  # reused: same manifest, including its generation time
    other = make_synthetic(str(tmp_path / "b"), **SMALL)
    for a, b in zip(synthetic["files"], other["files"]):
        if a.endswith(".tar") or a.endswith(".json"):
            assert open(a, "rb").read() == open(b, "rb").read(), a
    seed1 = make_synthetic(str(tmp_path / "c"), **dict(SMALL, seed=1))
    assert open(seed1["files"][0], "rb").read() != open(synthetic["files"][0], "rb").read()


def test_rendered_pixels_match_the_named_attributes():
    rng = random.Random(3)
    for _ in range(30):
        scene = sample_scene(rng)
        img = np.asarray(render(scene, 64, rng)).astype(int)
        cell = 64 / 3
        for o in scene.objects:
            row, col = divmod(o.cell, 3)
            region = img[int(row * cell):int((row + 1) * cell), int(col * cell):int((col + 1) * cell)]
            # objects stay inside their cell: its pixels hold the named colour, and large objects
            # cover about four times the area of small ones
            close = (np.abs(region - np.array(COLOURS[o.colour])).sum(-1) < 40).sum()
            assert close >= (80 if o.size == "large" else 12), (o, close)
            if o.size == "small":
                assert close < 80
        text = caption(scene, rng)
        for o in scene.objects:
            assert o.colour in text and o.shape in text


def test_questions_and_statements_on_a_known_scene():
    left = Scene((Obj("circle", "red", "large", 0), Obj("square", "blue", "small", 8),
                  Obj("square", "blue", "small", 4)), 0)
    right = Scene((Obj("triangle", "green", "small", 2),), 0)
    rng = random.Random(0)
    answers = {}
    for _ in range(200):
        q, a = question(left, rng)
        answers[q] = a
    assert answers.get("how many squares are there?", "two") == "two"
    assert answers.get("what color is the circle?", "red") == "red"
    assert answers.get("where is the red circle?", CELLS[0]) == "top left"
    assert answers.get("is there a red square?", "no") == "no"
    truths = {}
    for _ in range(400):
        s, label = statement(left, right, rng)
        truths[s] = label
    assert truths.get("there are more squares in the left image than in the right image", True) is True
    assert truths.get("both images contain a circle", False) is False
    assert truths.get("the right image contains a green triangle", True) is True
    assert truths.get("exactly one image contains a blue object", True) is True
    assert len(truths) > 20
