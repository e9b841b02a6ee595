"""Every kind of bad input is skipped (or converted) and counted; the run never stops."""
import io
import tarfile

import numpy as np
import psutil
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import png
from vlmo_large.data import build_loader


def _jpeg(img) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return out.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rgb = Image.new("RGB", (16, 16), (10, 200, 30))
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red: composited to white
    gray16 = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    samples = [
        {"__key__": "good", "png": png(rgb), "txt": "a green square"},
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "txt": "x"},
        {"__key__": "truncated_image", "jpg": _jpeg(Image.effect_noise((64, 64), 50).convert("RGB"))[:300], "txt": "x"},
        {"__key__": "zero_bytes", "jpg": b"", "txt": "x"},
        {"__key__": "gray", "png": png(rgb.convert("L")), "txt": "a gray one"},
        {"__key__": "rgba", "png": png(rgba), "txt": "transparent"},
        {"__key__": "cmyk", "jpg": _jpeg(rgb.convert("CMYK")), "txt": "printed"},
        {"__key__": "gray16", "png": png(gray16), "txt": "sixteen bits"},
        {"__key__": "no_caption", "png": png(rgb)},
        {"__key__": "empty_caption", "png": png(rgb), "txt": "  \n "},
        {"__key__": "latin1", "png": png(rgb), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "no_image", "txt": "a caption without its image"},
        {"__key__": "good2", "png": png(rgb), "txt": "another green square"},
        # every JSON shape a caption file can have (item 11): only strings are captions
        {"__key__": "json_number", "png": png(rgb), "json": b'{"caption": 5}'},
        {"__key__": "json_top_number", "png": png(rgb), "json": b"5"},
        {"__key__": "json_bool", "png": png(rgb), "json": b'{"caption": true}'},
        {"__key__": "json_null", "png": png(rgb), "json": b'{"captions": null}'},
        {"__key__": "json_top_null", "png": png(rgb), "json": b"null"},
        {"__key__": "json_nested", "png": png(rgb), "json": b'{"caption": {"en": "a square"}}'},
        {"__key__": "json_list_of_numbers", "png": png(rgb), "json": b"[1, 2.5, null, {}]"},
        {"__key__": "json_empty_strings", "png": png(rgb), "json": b'{"captions": ["", "  "]}'},
        {"__key__": "json_mixed", "png": png(rgb), "json": b'{"captions": [null, 5, "", "a mixed one"]}'},
    ]
    _write(d / "bad-000000.tar", samples)
    _write(d / "full.tar", [{"__key__": f"t{i}", "png": png(rgb), "txt": f"ok {i}"} for i in range(4)])
    # cut the second shard inside the image of its third record
    with tarfile.open(d / "full.tar") as tar:
        member = [m for m in tar.getmembers() if m.name == "t2.png"][0]
    data = (d / "full.tar").read_bytes()
    (d / "bad-000001.tar").write_bytes(data[:member.offset_data + 20])
    # bad-000002.tar is never written: a missing shard
    (d / "bad-000003.tar").write_bytes(b"<html>a login page, not a tar</html>\n" * 40)
    (d / "bad-000004.tar").write_bytes(b"")
    # the same key twice in a row: webdataset's grouping would merge them into one sample
    _write(d / "bad-000005.tar", [{"__key__": "dup", "png": png(rgb), "txt": "first copy"},
                                  {"__key__": "dup", "png": png(rgb), "txt": "second copy"},
                                  {"__key__": "dup", "png": png(rgb), "txt": "third copy"},
                                  {"__key__": "after_dup", "png": png(rgb), "txt": "after"}])
    return d


SHARDS = "bad-{000000..000005}.tar"
EXPECTED = {"corrupt_image": 2, "empty_image": 1, "missing_caption": 1, "empty_caption": 2, "bad_text_encoding": 1,
            "bad_caption_json": 7, "missing_image": 1, "truncated_shard": 1, "missing_shard": 1, "not_a_tar": 2,
            "duplicate_key": 2}
CONVERTED = {"converted_L": 1, "converted_RGBA": 1, "converted_CMYK": 1, "converted_I;16": 1}
GOOD = {"good", "good2", "gray", "rgba", "cmyk", "gray16", "json_mixed", "t0", "t1", "dup", "after_dup"}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_case_is_skipped_and_counted(bad_shards, tokenizer, workers):
    loader = build_loader("image_text", str(bad_shards / SHARDS), 2, tokenizer=tokenizer,
                          image_size=16, patch_size=16, max_text_len=16, train=False, drop_last=False,
                          num_workers=workers)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(GOOD)
    assert loader.skip_counts() == EXPECTED
    assert loader.converted_counts() == CONVERTED, "converted and used: not a skip"
    texts = {k: b["text_ids"][i] for b in batches for i, k in enumerate(b["keys"])}
    assert texts["json_mixed"].tolist() == tokenizer.encode("a mixed one", 16)[0]
    assert texts["dup"].tolist() == tokenizer.encode("first copy", 16)[0], "the first of duplicate keys is kept"
    images = {k: b["image"][i] for b in batches for i, k in enumerate(b["keys"])}
    assert torch.allclose(images["rgba"], torch.ones(3, 16, 16), atol=1e-3), "transparent -> white"
    assert torch.allclose(images["gray16"], torch.ones(3, 16, 16), atol=1e-3), "16-bit max -> 255, not clipped"
    expected_green = torch.tensor([10, 200, 30]).view(3, 1, 1) / 127.5 - 1
    assert torch.allclose(images["cmyk"], expected_green.expand(3, 16, 16), atol=0.05)


def test_skip_counts_survive_resume(bad_shards, tokenizer):
    def make():
        return build_loader("image_text", str(bad_shards / SHARDS), 2, tokenizer=tokenizer,
                            image_size=16, max_text_len=16, train=False, drop_last=False)
    first = make()
    next(iter(first))  # "good" and "gray": the three bad images between them are counted
    assert first.skip_counts() == {"corrupt_image": 2, "empty_image": 1}
    assert first.converted_counts() == {"converted_L": 1}
    second = make()
    second.load_state_dict(first.state_dict())
    list(second)
    assert second.skip_counts() == EXPECTED and second.converted_counts() == CONVERTED


def test_image_only_stream_skips_text_problems_it_does_not_need(bad_shards):
    loader = build_loader("image", str(bad_shards / SHARDS), 1, image_size=16,
                          train=False, drop_last=False)
    keys = {k for b in loader for k in b["keys"]}
    assert keys == GOOD | {"no_caption", "empty_caption", "latin1"} | {
        k for k in ("json_number", "json_top_number", "json_bool", "json_null", "json_top_null", "json_nested",
                    "json_list_of_numbers", "json_empty_strings")}
    assert loader.skip_counts()["missing_image"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_never_sends_a_byte_is_skipped_after_the_timeout(bad_shards, tokenizer, tmp_path, workers):
    """A FIFO nobody writes (a hung mount: even open() blocks) and a pipe: command that never writes."""
    import os
    import time
    fifo = tmp_path / "hung.tar"
    os.mkfifo(fifo)
    shards = [str(bad_shards / "bad-000001.tar"), str(fifo), "pipe:sleep 987 | cat", str(bad_shards / "bad-000005.tar")]
    loader = build_loader("image_text", shards, 2, tokenizer=tokenizer, image_size=16, max_text_len=16,
                          train=False, drop_last=False, num_workers=workers, shard_timeout=1.5)
    start = time.monotonic()
    try:
        keys = sorted(k for b in loader for k in b["keys"])
    finally:
        try:  # release the reader thread still blocked in open() of the FIFO
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert keys == ["after_dup", "dup", "t0", "t1"], "the shards after the hung ones are read"
    assert loader.skip_counts() == {"truncated_shard": 1, "shard_timeout": 2, "duplicate_key": 2}
    assert time.monotonic() - start < 60
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "987"]], \
        "the stalled pipe's command is killed"
