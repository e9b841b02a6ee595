import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from conftest import folder_records
from vlmo_large.data import build_loader
from vlmo_large.data.transforms import eval_transform, train_transform


def _all_records(pattern_dir, prefix="train-"):
    return folder_records(pattern_dir, prefix)


def test_image_text_batches_match_independent_decoding(synthetic, tokenizer):
    loader = build_loader("image_text", synthetic["image_text"]["val"], 8, tokenizer=tokenizer,
                          image_size=64, max_text_len=32, train=False)
    records = _all_records(os.path.dirname(synthetic["image_text"]["val"]), "val-")
    batches = list(loader)
    assert len(batches) == 20 // 8  # drop_last
    batch = batches[0]
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 64, 64)
    for name in ("text_ids", "text_mask", "mlm_ids", "mlm_labels", "index"):
        assert batch[name].dtype == torch.int64
    assert batch["keys"] == sorted(records)[:8]  # eval: shard order, no shuffling
    tf = eval_transform(64)
    for i, key in enumerate(batch["keys"]):
        rec = records[key]
        ids, mask = tokenizer.encode(rec["txt"].decode(), 32)
        assert batch["text_ids"][i].tolist() == ids and batch["text_mask"][i].tolist() == mask
        assert ids[0] == tokenizer.cls_id and ids[sum(mask) - 1] == tokenizer.sep_id
        assert torch.equal(batch["image"][i], tf(Image.open(io.BytesIO(rec["png"])).convert("RGB")))
        predicted = batch["mlm_labels"][i] != -100
        assert predicted.any()
        assert torch.equal(batch["mlm_labels"][i][predicted], batch["text_ids"][i][predicted])
        assert torch.equal(batch["mlm_ids"][i][~predicted], batch["text_ids"][i][~predicted])
    assert len(set(batch["index"].tolist())) == 8


def test_image_and_text_kinds(synthetic, tokenizer):
    img = next(iter(build_loader("image", synthetic["image"]["train"], 4, image_size=64, mim_ratio=0.5)))
    assert set(img) == {"image", "mim_mask", "keys", "index"}
    assert img["mim_mask"].dtype == torch.bool and img["mim_mask"].shape == (4, 16)
    assert (img["mim_mask"].sum(1) == 8).all()
    txt = next(iter(build_loader("text", synthetic["text"]["train"], 4, tokenizer=tokenizer, max_text_len=196)))
    assert set(txt) == {"text_ids", "text_mask", "mlm_ids", "mlm_labels", "keys", "index"}
    assert txt["text_ids"].shape == (4, 196) and (txt["text_ids"][:, 0] == tokenizer.cls_id).all()
    assert ((txt["text_ids"] == 0) == (txt["text_mask"] == 0)).all()


def test_train_transform_is_the_spec_pipeline():
    steps = train_transform(224).transforms
    rrc, flip, ra = steps[0], steps[1], steps[2]
    assert isinstance(rrc, RandomResizedCropAndInterpolation) and rrc.scale == (0.5, 1.0)
    assert rrc.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(ra, RandAugment) and ra.num_layers == 2 and {op.magnitude for op in ra.ops} == {7}
    norm = steps[-1]
    assert norm.mean.tolist() == [0.5] * 3 and norm.std.tolist() == [0.5] * 3


def test_ranks_partition_and_epochs_reshuffle(synthetic, tokenizer):
    all_keys = set(_all_records(os.path.dirname(synthetic["image_text"]["train"])))

    def keys(rank, epoch, world=2):
        loader = build_loader("image_text", synthetic["image_text"]["train"], 10, tokenizer=tokenizer,
                              image_size=64, max_text_len=32, rank=rank, world_size=world,
                              epoch=epoch, drop_last=False, augment="light", shuffle_buffer=50)
        return [k for b in loader for k in b["keys"]]

    r0, r1 = keys(0, 0), keys(1, 0)
    assert len(r0) == len(set(r0)) == 120 and not set(r0) & set(r1) and set(r0) | set(r1) == all_keys
    assert keys(0, 0) == r0, "same epoch, same order"
    e1 = keys(0, 1) + keys(1, 1)
    assert sorted(e1) == sorted(all_keys) and e1[:120] != r0


def test_rank_defaults_follow_torch_distributed(monkeypatch, synthetic, tokenizer):
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    loader = build_loader("text", synthetic["text"]["train"], 2, tokenizer=tokenizer)
    assert (loader.stream.rank, loader.stream.world_size) == (3, 4)
    # an explicitly passed data-parallel rank/size wins (tensor/pipeline parallel runs)
    loader = build_loader("text", synthetic["text"]["train"], 2, tokenizer=tokenizer, rank=1, world_size=2)
    assert (loader.stream.rank, loader.stream.world_size) == (1, 2)


def test_pattern_matching_nothing_is_an_error(tmp_path, tokenizer):
    pattern = str(tmp_path / "nothing-{000..004}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        build_loader("text", pattern, 2, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        build_loader("text", [str(tmp_path / "*.tar")], 2, tokenizer=tokenizer)
