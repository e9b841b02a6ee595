"""Every kind of bad input is skipped (or converted) and counted; the run never stops."""
import io
import tarfile

import numpy as np
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
    ]
    _write(d / "bad-000000.tar", samples)
    _write(d / "full.tar", [{"__key__": f"t{i}", "png": png(rgb), "txt": f"ok {i}"} for i in range(4)])
    # cut the second shard inside the image of its third record
    with tarfile.open(d / "full.tar") as tar:
        member = [m for m in tar.getmembers() if m.name == "t2.png"][0]
    data = (d / "full.tar").read_bytes()
    (d / "bad-000001.tar").write_bytes(data[:member.offset_data + 20])
    # bad-000002.tar is never written: a missing shard
    return d


EXPECTED = {"corrupt_image": 2, "empty_image": 1, "converted_L": 1, "converted_RGBA": 1, "converted_CMYK": 1,
            "converted_I;16": 1, "missing_caption": 1, "empty_caption": 1, "bad_text_encoding": 1,
            "missing_image": 1, "truncated_shard": 1, "missing_shard": 1}
GOOD = {"good", "good2", "gray", "rgba", "cmyk", "gray16", "t0", "t1"}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_case_is_skipped_and_counted(bad_shards, tokenizer, workers):
    loader = build_loader("image_text", str(bad_shards / "bad-{000000..000002}.tar"), 2, tokenizer=tokenizer,
                          image_size=16, patch_size=16, max_text_len=16, train=False, drop_last=False,
                          num_workers=workers)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(GOOD)
    assert loader.skip_counts() == EXPECTED
    images = {k: b["image"][i] for b in batches for i, k in enumerate(b["keys"])}
    assert torch.allclose(images["rgba"], torch.ones(3, 16, 16), atol=1e-3), "transparent -> white"
    assert torch.allclose(images["gray16"], torch.ones(3, 16, 16), atol=1e-3), "16-bit max -> 255, not clipped"
    expected_green = torch.tensor([10, 200, 30]).view(3, 1, 1) / 127.5 - 1
    assert torch.allclose(images["cmyk"], expected_green.expand(3, 16, 16), atol=0.05)


def test_skip_counts_survive_resume(bad_shards, tokenizer):
    def make():
        return build_loader("image_text", str(bad_shards / "bad-{000000..000002}.tar"), 2, tokenizer=tokenizer,
                            image_size=16, max_text_len=16, train=False, drop_last=False)
    first = make()
    next(iter(first))  # "good" and "gray": the three bad images between them are counted
    assert first.skip_counts() == {"corrupt_image": 2, "empty_image": 1, "converted_L": 1}
    second = make()
    second.load_state_dict(first.state_dict())
    list(second)
    assert second.skip_counts() == EXPECTED


def test_image_only_stream_skips_text_problems_it_does_not_need(bad_shards):
    loader = build_loader("image", str(bad_shards / "bad-{000000..000002}.tar"), 1, image_size=16,
                          train=False, drop_last=False)
    keys = {k for b in loader for k in b["keys"]}
    assert keys == GOOD | {"no_caption", "empty_caption", "latin1"}
    assert loader.skip_counts()["missing_image"] == 1
