"""The pairs tool on bad tables (skip, count, say where), table metadata, and held-out splits."""
import json
import os

import pytest
from PIL import Image

from conftest import folder_records
from tools.make_shards import main as make_shards


def _images(folder, names):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (24, 16), (10 * i, 100, 200)).save(folder / name)


def _shard_records(folder, prefix="shard"):
    return folder_records(folder, prefix)


def test_bad_jsonl_lines_and_captions_are_skipped_counted_and_located(tmp_path, capsys):
    _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    lines = ['{"image": "imgs/a.png", "caption": "a good one", "label": "cat", "source": {"id": 7}}',
             '{"image": "imgs/b.png", "caption": "broken', '["imgs/b.png", "a list"]',
             '{"image": "imgs/b.png", "captions": null}',
             '{"image": "imgs/c.png", "captions": [null, 5, "", "the only caption"]}',
             '{"caption": "no image"}', '{"image": "imgs/c.png", "captions": ["second of c"], "label": "dog"}']
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    index = make_shards(["pairs", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"), "--procs", "1"])
    assert index["skipped"] == {"bad_json": 1, "not_an_object": 1, "caption_not_text": 3, "empty_caption": 1,
                                "missing_image_field": 1}
    printed = capsys.readouterr().out
    for line, reason in ((2, "bad_json"), (3, "not_an_object"), (4, "caption_not_text"), (5, "caption_not_text"),
                         (5, "empty_caption"), (6, "missing_image_field")):
        assert f"t.jsonl:{line}: {reason}" in printed
    records = list(_shard_records(tmp_path / "o").values())
    assert [r["txt"].decode() for r in records] == ["a good one", "the only caption", "second of c"]
    assert [json.loads(r["meta.json"]) if "meta.json" in r else None for r in records] == \
        [{"label": "cat", "source": {"id": 7}}, None, {"label": "dog"}], "other fields kept as metadata"


def test_csv_without_caption_column_is_one_line_and_exit_2(tmp_path, capsys):
    _images(tmp_path, ["a.png"])
    (tmp_path / "t.csv").write_text("image,text,label\na.png,a caption,cat\n")
    with pytest.raises(SystemExit) as exited:
        make_shards(["pairs", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--procs", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 't.csv'}: no 'caption' column; it has 'image', "
                                               "'text', 'label'")
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_csv_columns_become_metadata(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "t.csv").write_text("image,caption,label,split\na.png,first,cat,x\nb.png,,dog,y\nb.png,other,dog,z\n")
    index = make_shards(["pairs", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--procs", "1"])
    assert index["skipped"] == {"empty_caption": 1}
    records = list(_shard_records(tmp_path / "o").values())
    assert [(r["txt"].decode(), json.loads(r["meta.json"])) for r in records] == [
        ("first", {"label": "cat", "split": "x"}), ("other", {"label": "dog", "split": "z"})]


def test_heldout_split_writes_the_retrieval_json_the_evaluator_reads(tmp_path, tokenizer):
    from vlmo_large.data import build_loader
    names = [f"{i}.png" for i in range(8)]
    _images(tmp_path / "imgs", names)
    rows = [{"image": f"imgs/{n}", "caption": f"picture {n} alone"} for n in names]
    rows += [{"image": f"imgs/{n}", "caption": "a repeated caption", "label": i} for i, n in enumerate(names)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    index = make_shards(["pairs", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"), "--procs", "1",
                         "--heldout", "3", "--samples-per-shard", "2"])
    held = index["heldout"]
    assert index["samples"] == 5 * 2 and held["samples"] == 3
    with open(held["retrieval_json"]) as f:
        gold = json.load(f)
    # independent: the held-out shards' own records against the table
    held_records = _shard_records(tmp_path / "o" / "heldout", prefix="heldout")
    assert sorted(gold["images"]) == sorted(held_records)
    train_images = {r["png"] for r in _shard_records(tmp_path / "o").values()}
    for i, key in enumerate(gold["images"]):
        rec = held_records[key]
        assert rec["png"] not in train_images, "a held-out image is not in the training shards"
        name = next(n for n in names if open(tmp_path / "imgs" / n, "rb").read() == rec["png"])
        expected = [f"picture {name} alone", "a repeated caption"]
        assert [gold["texts"][j] for j in gold["img2txt"][i]] == expected
        assert all(gold["txt2img"][j] == i for j in gold["img2txt"][i])
        assert json.loads(rec["json"])["captions"] == expected
    assert len(gold["texts"]) == len(gold["txt2img"]) == 6
    # the evaluator's loader reads the split's shards in full
    loader = build_loader("image_text", held["pattern"], 2, tokenizer=tokenizer, image_size=16, patch_size=16,
                          max_text_len=16, train=False, drop_last=False)
    assert sorted(k for b in loader for k in b["keys"]) == sorted(gold["images"])
    # and the evaluator itself runs on it (a random tiny model: only the plumbing is checked here)
    from vlmo_large.evaluation.heldout_retrieval import heldout_retrieval
    from vlmo_large.model import build_model
    metrics, (_, image_feats, text_feats, _) = heldout_retrieval(
        build_model("tiny"), {"shards": held["pattern"], "json": held["retrieval_json"]}, tokenizer, 64, 32)
    assert image_feats.shape[0] == 3 and text_feats.shape[0] == 6 and metrics["chance_r1"] == pytest.approx(1 / 3)
