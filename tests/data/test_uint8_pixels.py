"""uint8 pixels from the loader, normalised after the copy, equal the float loader's images."""
import json

import pytest
import torch

from vlmo_large.data import build_loader
from vlmo_large.data.device_batch import model_pixels, normalize_pixels, to_device
from vlmo_large.data.worker_batches import batch_items


def _batches(synthetic, tokenizer, pixels, **kw):
    args = dict(tokenizer=tokenizer, image_size=64, max_text_len=32, seed=5, shuffle_buffer=16, pixels=pixels)
    return list(build_loader("image_text", synthetic["image_text"]["train"], 8, **{**args, **kw}))[:3]


@pytest.mark.parametrize("train", [True, False])  # the spec's RandAugment pipeline and the eval resize
def test_uint8_batches_normalised_on_the_device_equal_the_float_path(synthetic, tokenizer, train):
    floats = _batches(synthetic, tokenizer, "float", train=train)
    raws = _batches(synthetic, tokenizer, "uint8", train=train)
    for f, r in zip(floats, raws):
        assert r["image"].dtype == torch.uint8 and r["image"].shape == f["image"].shape
        assert r["keys"] == f["keys"] and torch.equal(r["mlm_ids"], f["mlm_ids"])
        moved = to_device(r, "cpu", torch.float32)
        assert torch.equal(moved["image"], f["image"]), "bit-identical on the CPU (max abs diff 0)"
        # independent: the normalisation in float64 by hand
        by_hand = (r["image"].double() / 255 - 0.5) / 0.5
        assert (moved["image"].double() - by_hand).abs().max() < 1e-6


def test_float_images_pass_through_and_model_dtype_is_applied():
    images = torch.randn(2, 3, 4, 4)
    batch = {"image": images, "text_ids": torch.arange(4).view(1, 4), "keys": ["a", "b"]}
    out = to_device(batch, "cpu", torch.bfloat16)
    assert torch.equal(out["image"], images.to(torch.bfloat16)) and out["keys"] == ["a", "b"]
    assert out["text_ids"].dtype == torch.int64
    raw = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    expected = torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(model_pixels(raw, "cpu", torch.float32), expected, atol=1e-7)
    assert normalize_pixels(raw, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(images, torch.float32)


def test_only_images_take_the_model_dtype_targets_stay_float32():
    """A bf16 run's VQA soft targets stay 0.3, not bf16's 0.30078 (the loss and vqa_score read them)."""
    targets = torch.tensor([[0.3, 0.6, 0.9, 1.0]])
    batch = {"image": torch.randn(1, 3, 4, 4), "image2": torch.randn(1, 3, 4, 4), "vqa_targets": targets,
             "text_mask": torch.ones(1, 4, dtype=torch.int64)}
    out = to_device(batch, "cpu", torch.bfloat16)
    assert out["image"].dtype == out["image2"].dtype == torch.bfloat16
    assert out["vqa_targets"].dtype == torch.float32 and torch.equal(out["vqa_targets"], targets)
    assert out["vqa_targets"][0, 0].item() == torch.tensor(0.3).item() != torch.tensor(0.3).bfloat16().item()
    assert out["text_mask"].dtype == torch.int64


def test_worker_cuts_whole_batches_and_sends_its_tail_with_its_end():
    samples = [{"w": 1, "pos": p, "events": {"corrupt_image": p % 2}, "completed": [], "sample":
                {"image": torch.full((3, 2, 2), p, dtype=torch.uint8), "key": f"k{p}", "index": p}} for p in range(1, 6)]
    end = {"w": 1, "pos": 7, "events": {"x": 1}, "completed": ["s.tar"], "sample": None, "end": True}
    items = list(batch_items([{"w": 1, "placeholder": True}] + samples + [end], 2))
    assert items[0] == {"w": 1, "placeholder": True}
    assert [i["batch"]["keys"] for i in items[1:3]] == [["k1", "k2"], ["k3", "k4"]]
    assert items[2]["batch"]["image"].shape == (2, 3, 2, 2) and items[2]["pos"] == [3, 4]
    last = items[3]
    assert last["end"] and [s["key"] for s in last["tail"]] == ["k5"] and last["pos"] == [5]
    assert (last["end_pos"], last["end_completed"]) == (7, ["s.tar"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_uint8_loader_resumes_exactly_while_a_finished_workers_tail_waits(synthetic, tokenizer):
    # 8 shards over 3 workers: 90, 90 and 60 samples; worker 2 ends (tail of 4 waiting) while 0 and 1 go on
    def make():
        return build_loader("image_text", synthetic["image_text"]["train"], 7, tokenizer=tokenizer, image_size=64,
                            max_text_len=32, rank=0, world_size=1, num_workers=3, seed=7, shuffle_buffer=16,
                            pixels="uint8")
    full = list(make())
    assert len(full) == 240 // 7
    for cut in (28, 33):  # tail pending while others yield; inside the joined tails
        first = make()
        head = [b for _, b in zip(range(cut), first)]
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = list(resumed)
        assert [k for b in head + tail for k in b["keys"]] == [k for b in full for k in b["keys"]], cut
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(head + tail, full))
