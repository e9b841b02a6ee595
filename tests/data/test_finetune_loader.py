"""Loader kinds "vqa" and "nlvr2" on fake official inputs packed by the tool: every batch field against
an independent computation from the source files (the official VQA accuracy for the soft targets, the
eval transform of each image file, the tokenizer on the text), skips counted, image2 normalised on the
device, and the random source's batches laid out like the loader's."""
import json
import os

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import folder_records
from finetune_fakes import fake_nlvr2, fake_vqa
from tools.make_shards import main as make_shards
from vlmo_large.config import get_preset
from vlmo_large.data import build_loader
from vlmo_large.data.device_batch import to_device
from vlmo_large.data.transforms import eval_transform
from vlmo_large.evaluation.vqa_metric import vqa_accuracy
from vlmo_large.training.random_batches import random_batch

SIZE, TEXT_LEN = 32, 12
VOCABULARY = ["maybe", "yes", "blue", "no", "green", "2", "unused"]


def _pixels(path):
    return eval_transform(SIZE)(Image.open(path).convert("RGB"))


def _load(kind, shards, tokenizer, **kw):
    args = dict(tokenizer=tokenizer, image_size=SIZE, max_text_len=TEXT_LEN, train=False, drop_last=False)
    return build_loader(kind, shards, 16, **{**args, **kw})


@pytest.fixture(scope="module")
def vqa_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    questions, annotations, images, good, _ = fake_vqa(root)
    index = make_shards(["vqa", questions, "--annotations", annotations, "--image-root", images, "--procs", "1",
                         "--out", str(root / "out"), "--answers", "--answers-min-count", "1"])
    return index, good


@pytest.fixture(scope="module")
def nlvr2_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    path, images, good, _ = fake_nlvr2(root)
    return make_shards(["nlvr2", path, "--image-root", images, "--out", str(root / "out"), "--procs", "1"]), good


def test_vqa_batch_fields_equal_their_source(vqa_shards, tokenizer):
    index, good = vqa_shards
    (batch,) = list(_load("vqa", index["pattern"], tokenizer, answers=VOCABULARY))
    assert set(batch) == {"image", "text_ids", "text_mask", "vqa_targets", "qid", "vqa_answers", "keys", "index"}
    assert batch["vqa_targets"].dtype == torch.float32 and batch["qid"].dtype == torch.int64
    assert sorted(batch["qid"].tolist()) == sorted(good)
    for row, qid in enumerate(batch["qid"].tolist()):
        question, humans, image = good[qid]
        ids, mask = tokenizer.encode(question, TEXT_LEN)
        assert batch["text_ids"][row].tolist() == ids and batch["text_mask"][row].tolist() == mask
        assert batch["vqa_answers"][row] == humans
        # the target of each vocabulary answer is its official accuracy against the ten humans
        expected = [vqa_accuracy(answer, humans) for answer in VOCABULARY]
        assert batch["vqa_targets"][row].tolist() == pytest.approx(expected, abs=1e-6)
        assert torch.equal(batch["image"][row], _pixels(image))
    assert batch["vqa_targets"][batch["qid"].tolist().index(10)].tolist() == pytest.approx(
        [0.3, 1.0, 0, 0.9, 0, 0, 0])  # HUMANS: yes x6, no x3, maybe x1, by hand
    # the vocabulary from the tool's JSON: its width and order
    (from_file,) = list(_load("vqa", index["pattern"], tokenizer, answers=index["answers"]))
    assert json.load(open(index["answers"])) == ["yes", "2", "green"]
    assert from_file["vqa_targets"].shape == (3, 3)
    assert from_file["vqa_targets"][from_file["qid"].tolist().index(20)].tolist() == pytest.approx([0, 0, 1.0])


def test_vqa_training_skips_questions_without_a_known_answer_evaluation_keeps_them(vqa_shards, tokenizer):
    index, _ = vqa_shards
    train = _load("vqa", index["pattern"], tokenizer, answers=["blue"], train=True, augment="none")
    assert [b["qid"].tolist() for b in train] == [[20]]
    assert train.skip_counts() == {"vqa_no_known_answer": 2}
    (evaluation,) = list(_load("vqa", index["pattern"], tokenizer, answers=["blue"]))
    assert sorted(zip(evaluation["qid"].tolist(), evaluation["vqa_targets"][:, 0].tolist())) == [
        (10, 0.0), (11, 0.0), (20, pytest.approx(0.6))]


def test_nlvr2_batch_fields_equal_their_source(nlvr2_shards, tokenizer):
    index, good = nlvr2_shards
    (batch,) = list(_load("nlvr2", index["pattern"], tokenizer))
    assert set(batch) == {"image", "image2", "text_ids", "text_mask", "nlvr2_labels", "keys", "index"}
    records = folder_records(os.path.dirname(index["pattern"]), "shard-")  # key -> identifier, read independently
    assert sorted(json.loads(records[key]["json"])["id"] for key in batch["keys"]) == sorted(good)
    for row, key in enumerate(batch["keys"]):
        sentence, label, left, right = good[json.loads(records[key]["json"])["id"]]
        ids, mask = tokenizer.encode(sentence, TEXT_LEN)
        assert batch["text_ids"][row].tolist() == ids and batch["text_mask"][row].tolist() == mask
        assert batch["nlvr2_labels"][row].item() == int(label)
        assert torch.equal(batch["image"][row], _pixels(left)) and torch.equal(batch["image2"][row], _pixels(right))
    # uint8 pixels: to_device normalises image2 like image, to the float loader's values
    (raw,) = list(_load("nlvr2", index["pattern"], tokenizer, pixels="uint8"))
    assert raw["image2"].dtype == torch.uint8
    moved = to_device(raw, "cpu", torch.float32)
    assert torch.equal(moved["image"], batch["image"]) and torch.equal(moved["image2"], batch["image2"])


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer):
    png = open(fake_nlvr2(tmp_path)[2]["train-1-0-0"][2], "rb").read()
    good_vqa = json.dumps({"question": "q", "answers": ["yes"] * 10, "qid": 1}).encode()
    with wds.TarWriter(str(tmp_path / "vqa.tar")) as sink:
        sink.write({"__key__": "good", "png": png, "json": good_vqa})
        sink.write({"__key__": "notjson", "png": png, "json": b"{bad"})
        sink.write({"__key__": "qidtext", "png": png, "json": json.dumps({"question": "q", "answers": [],
                                                                          "qid": "7"}).encode()})
        sink.write({"__key__": "noimage", "json": good_vqa})
    loader = _load("vqa", str(tmp_path / "vqa.tar"), tokenizer, answers=["yes"])
    assert [k for b in loader for k in b["keys"]] == ["good"]
    assert loader.skip_counts() == {"bad_vqa_json": 2, "missing_image": 1}
    label = json.dumps({"sentence": "s", "label": True}).encode()
    with wds.TarWriter(str(tmp_path / "nlvr2.tar")) as sink:
        sink.write({"__key__": "good", "img0.png": png, "img1.png": png, "json": label})
        sink.write({"__key__": "oneimage", "img0.png": png, "json": label})
        sink.write({"__key__": "textlabel", "img0.png": png, "img1.png": png,
                    "json": json.dumps({"sentence": "s", "label": "True"}).encode()})
    loader = _load("nlvr2", str(tmp_path / "nlvr2.tar"), tokenizer)
    assert [k for b in loader for k in b["keys"]] == ["good"]
    assert loader.skip_counts() == {"missing_image": 1, "bad_nlvr2_json": 1}


def test_vqa_needs_a_vocabulary_of_strings(vqa_shards, tokenizer, tmp_path):
    from vlmo_large.errors import UserError
    with pytest.raises(ValueError, match="needs the answer vocabulary"):
        _load("vqa", vqa_shards[0]["pattern"], tokenizer)
    (tmp_path / "answers.json").write_text(json.dumps({"yes": 0}))
    with pytest.raises(UserError, match="non-empty JSON list of strings"):
        _load("vqa", vqa_shards[0]["pattern"], tokenizer, answers=str(tmp_path / "answers.json"))
    with pytest.raises(UserError, match="lists 'yes' twice"):
        _load("vqa", vqa_shards[0]["pattern"], tokenizer, answers=["yes", "no", "yes"])


@pytest.mark.parametrize("kind", ["vqa", "nlvr2"])
def test_random_batches_are_laid_out_like_the_loader(kind, vqa_shards, nlvr2_shards, tokenizer):
    shards, answers = (vqa_shards[0]["pattern"], VOCABULARY) if kind == "vqa" else (nlvr2_shards[0]["pattern"], None)
    (real,) = list(_load(kind, shards, tokenizer, answers=answers))
    cfg = get_preset("tiny", image_size=SIZE, max_text_len=TEXT_LEN)
    fake = random_batch(kind, cfg, 2, torch.Generator().manual_seed(0), num_answers=len(VOCABULARY))
    assert set(fake) == set(real) - {"keys", "index"}
    for name, value in fake.items():
        if torch.is_tensor(value):
            assert (value.dtype, value.shape[1:]) == (real[name].dtype, real[name].shape[1:]), name
        else:
            assert len(value) == 2 and all(len(answers) == 10 for answers in value)
    if kind == "vqa":  # soft scores of the drawn answers, at least one per question
        scores = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0])
        assert ((fake["vqa_targets"][..., None] - scores).abs().min(-1).values < 1e-6).all()
        assert (fake["vqa_targets"].max(1).values > 0).all()
