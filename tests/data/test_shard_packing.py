import json
import os

import numpy as np
from PIL import Image

from conftest import tar_records
from tools.make_shards import main as make_shards


def _image(path, size=(40, 30), colour=(200, 10, 10)):
    Image.new("RGB", size, colour).save(path)
    return os.path.basename(path)


def test_pairs_from_jsonl_one_sample_per_caption_and_skip_report(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = [{"image": f"imgs/{_image(imgs / f'{i}.png')}", "captions": [f"cap {i} a", f"cap {i} b"]} for i in range(5)]
    rows.append({"image": "imgs/missing.jpg", "caption": "no file"})
    (imgs / "broken.jpg").write_bytes(b"not an image")
    rows.append({"image": "imgs/broken.jpg", "caption": "broken"})
    rows.append({"image": f"imgs/{_image(imgs / 'nocap.png')}", "caption": "   "})
    rows.append({"image": f"imgs/{_image(imgs / 'big.png', (900, 300))}", "caption": "big one"})
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    index = make_shards(["pairs", str(table), "--out", str(tmp_path / "out"), "--samples-per-shard", "4",
                         "--max-image-side", "128", "--procs", "2", "--key-prefix", "coco-"])
    assert index["skipped"] == {"missing_image_file": 1, "corrupt_image": 1, "empty_caption": 1}
    # independent check of what the tars hold
    shards = sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".tar"))
    records = {}
    for name, entry in zip(shards, index["shards"]):
        got = tar_records(str(tmp_path / "out" / name))
        assert entry == {"name": name, "samples": len(got)}
        records.update(got)
    assert index["samples"] == len(records) == 11  # 5 images x 2 captions + the big one
    captions = sorted(r["txt"].decode() for r in records.values())
    assert captions == sorted([f"cap {i} {s}" for i in range(5) for s in "ab"] + ["big one"])
    assert all(k.startswith("coco-") for k in records)
    big = next(r for r in records.values() if r["txt"] == b"big one")
    assert Image.open(__import__("io").BytesIO(big["jpg"])).size == (128, 43)
    assert os.path.exists(tmp_path / "out" / "shard-index.json")


def test_pairs_csv_grouped_captions(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    (tmp_path / "t.csv").write_text("image,caption\na.png,first\nb.png,other\na.png,second\n")
    make_shards(["pairs", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--group-captions", "--procs", "1"])
    recs = list(tar_records(str(tmp_path / "o" / "shard-000000.tar")).values())
    assert [json.loads(r["json"])["captions"] for r in recs if "json" in r] == [["first", "second"]]
    assert [r["txt"] for r in recs if "txt" in r] == [b"other"]
    original = np.asarray(Image.open(tmp_path / "a.png"))
    assert (np.asarray(Image.open(__import__("io").BytesIO(recs[0]["png"]))) == original).all()


def test_image_folder_and_text_files(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):
        _image(tmp_path / "imgs" / "sub" / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    index = make_shards(["images", str(tmp_path / "imgs"), "--out", str(tmp_path / "i"), "--procs", "1"])
    assert index["samples"] == 3 and index["kind"] == "image"
    assert all(set(r) == {"png"} for r in tar_records(str(tmp_path / "i" / "shard-000000.tar")).values())

    (tmp_path / "a.txt").write_bytes(b"line one\n\nline two\nbad \xff\xfe line\n")
    (tmp_path / "b.txt").write_bytes(b"doc one first\ndoc one second\n\ndoc two\n")
    lines = make_shards(["text", str(tmp_path / "a.txt"), "--out", str(tmp_path / "t1"), "--procs", "1"])
    assert lines["samples"] == 2 and lines["skipped"] == {"bad_text_encoding": 1}
    docs = make_shards(["text", str(tmp_path / "b.txt"), "--out", str(tmp_path / "t2"), "--documents", "--procs", "1"])
    texts = [r["txt"].decode() for r in tar_records(str(tmp_path / "t2" / "shard-000000.tar")).values()]
    assert docs["samples"] == 2 and texts == ["doc one first doc one second", "doc two"]
