"""tools/make_shards.py vqa / nlvr2 / karpathy: tiny fake inputs in the official layouts (finetune_fakes.py)
and the synthetic lists, packed and read back with plain tarfile: every field equals its source, every
fault is skipped, counted and listed with where it was."""
import json
import os
from collections import Counter

import pytest

from conftest import folder_records, tar_records
from finetune_fakes import fake_karpathy, fake_nlvr2, fake_vqa
from tools.make_shards import main as make_shards
from vlmo_large.data.shard_list import expand_shards


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_vqa_v2_files_pack_every_field_and_the_answer_vocabulary(tmp_path, capsys):
    questions, annotations, root, good, reasons = fake_vqa(tmp_path)
    out = tmp_path / "out"
    index = make_shards(["vqa", questions, "--annotations", annotations, "--image-root", root, "--out", str(out),
                         "--procs", "1", "--samples-per-shard", "2", "--answers", "--answers-min-count", "1"])
    assert index["skipped"] == {reason: 1 for reason in reasons}
    printed = capsys.readouterr().out
    for n, reason in zip((3, 4, 5, 6), reasons):
        assert f"skipped {questions}: questions[{n}]: {reason}" in printed
    records = folder_records(out, "shard-")
    assert len(records) == index["samples"] == 3 and len(index["shards"]) == 2
    by_qid = {json.loads(r["json"])["qid"]: r for r in records.values()}
    for qid, (question, answers, image) in good.items():
        assert json.loads(by_qid[qid]["json"]) == {"question": question, "answers": answers, "qid": qid}
        assert by_qid[qid]["jpg"] == _bytes(image)  # stored untouched
    # the packed questions' majority answers yes, 2, green, in first-occurrence order
    assert json.load(open(index["answers"])) == ["yes", "2", "green"]
    # with the annotation file's majority answers too: yes 4 times, 2 and green twice
    more = make_shards(["vqa", questions, "--annotations", annotations, "--image-root", root, "--procs", "1",
                        "--out", str(tmp_path / "more"), "--answers", "--answers-min-count", "3",
                        "--answers-from", annotations])
    assert json.load(open(more["answers"])) == ["yes"]


def test_vqa_test_split_without_annotations_keeps_every_question_with_no_answers(tmp_path):
    questions, _, root, _, _ = fake_vqa(tmp_path)
    index = make_shards(["vqa", questions, "--image-root", root, "--out", str(tmp_path / "test"), "--procs", "1"])
    assert index["skipped"] == {"missing_image_file": 1, "bad_question": 1}
    metas = sorted((json.loads(r["json"]) for r in folder_records(tmp_path / "test", "shard-").values()),
                   key=lambda m: m["qid"])
    assert [(m["qid"], m["answers"]) for m in metas] == [(q, []) for q in (10, 11, 20, 21, 22)]


def test_vqa_bad_inputs_stop_with_one_line(tmp_path, capsys):
    questions, annotations, root, _, _ = fake_vqa(tmp_path)
    (tmp_path / "broken.json").write_text('{"questions": [')
    for argv, message in (
            (["vqa", str(tmp_path / "broken.json")], "broken.json: the VQA questions file is not valid JSON"),
            (["vqa", questions, "--annotations", annotations, "--annotations", annotations],
             "--annotations given 2 times for 1 questions files"),
            (["vqa", questions, "--annotations", annotations, "--image-root", root, "--answers"],
             "no majority answer occurs 9 times")):
        with pytest.raises(SystemExit) as stop:
            make_shards(argv + ["--out", str(tmp_path / "x"), "--procs", "1"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_nlvr2_lines_pack_both_images_sentence_and_label(tmp_path, capsys):
    path, root, good, bad = fake_nlvr2(tmp_path)
    out = tmp_path / "out"
    index = make_shards(["nlvr2", path, "--image-root", root, "--out", str(out), "--procs", "1"])
    assert index["skipped"] == dict(Counter(bad.values()))
    printed = capsys.readouterr().out
    for line, reason in bad.items():
        assert f"skipped {path}:{line}: {reason}" in printed
    records = {json.loads(r["json"])["id"]: r for r in folder_records(out, "shard-").values()}
    assert set(records) == set(good)
    for identifier, (sentence, label, left, right) in good.items():
        record = records[identifier]
        assert set(record) == {"img0.png", "img1.png", "json"}
        assert json.loads(record["json"]) == {"sentence": sentence, "label": label, "id": identifier}
        assert record["img0.png"] == _bytes(left) and record["img1.png"] == _bytes(right)


def test_synthetic_vqa_and_nlvr2_lists_are_packed_as_they_are(synthetic, tmp_path):
    for task in ("vqa", "nlvr2"):
        listing = synthetic[task]["train"]
        entries, root = json.load(open(listing)), os.path.dirname(listing)
        shards = expand_shards(synthetic[task]["train_shards"])  # the manifest lists them
        assert set(shards) <= set(synthetic["files"])
        records = {k: r for path in shards for k, r in tar_records(path).items()}
        assert len(records) == len(entries)
        for entry, record in zip(entries, records.values()):  # packing keeps the list's order
            meta = json.loads(record["json"])
            if task == "vqa":
                assert meta == {"question": entry["question"], "answers": entry["answers"], "qid": entry["qid"]}
                assert record["png"] == _bytes(os.path.join(root, entry["image"]))
            else:
                assert meta == {"sentence": entry["sentence"], "label": entry["label"], "id": entry["id"]}
                assert [record["img0.png"], record["img1.png"]] == [_bytes(os.path.join(root, p))
                                                                  for p in entry["images"]]
    # the tool takes the same lists
    index = make_shards(["nlvr2", synthetic["nlvr2"]["val"], "--out", str(tmp_path / "o"), "--procs", "1"])
    packed = folder_records(os.path.dirname(synthetic["nlvr2"]["val"]), "val-")
    assert index["skipped"] == {}
    assert list(folder_records(tmp_path / "o", "shard-").values()) == list(packed.values())


def test_karpathy_train_per_caption_and_heldout_splits_with_their_retrieval_json(tmp_path, capsys):
    path, root, good, reasons = fake_karpathy(tmp_path)
    out = tmp_path / "out"
    index = make_shards(["karpathy", path, "--image-root", root, "--out", str(out), "--procs", "1"])
    assert index["skipped"] == {reason: 1 for reason in reasons}
    printed = capsys.readouterr().out
    assert f"skipped {path}: images[5]: missing_image_file" in printed
    assert f"skipped {path}: images[6]: unknown_split" in printed
    train = folder_records(out / "train", "train-")
    assert sorted((r["txt"].decode(), r["jpg"]) for r in train.values()) == sorted(
        (caption, _bytes(image)) for image, captions in good["train"] for caption in captions)
    assert all(json.loads(r["meta.json"])["filename"] == os.path.basename(image)
               for r, (image, _) in zip(list(train.values())[::2], good["train"]))
    for split in ("val", "test"):
        records = folder_records(out / split, f"{split}-")
        assert [json.loads(r["json"])["captions"] if "json" in r else [r["txt"].decode()]
                for r in records.values()] == [captions for _, captions in good[split]]
        assert [r["jpg"] for r in records.values()] == [_bytes(image) for image, _ in good[split]]
        gold = json.load(open(index[split]["retrieval_json"]))
        texts = [c for _, captions in good[split] for c in captions]
        starts = [sum(len(c) for _, c in good[split][:i]) for i in range(len(good[split]))]
        assert gold == {"images": list(records), "texts": texts,
                        "img2txt": [list(range(s, s + len(c))) for s, (_, c) in zip(starts, good[split])],
                        "txt2img": [i for i, (_, c) in enumerate(good[split]) for _ in c]}
    assert "eval.retrieval_json=" in printed
