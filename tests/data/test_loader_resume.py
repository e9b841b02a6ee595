"""Exact resume: interrupted runs must see exactly the samples of an uninterrupted epoch."""
import json
import os

import pytest
import torch

from conftest import tar_records
from vlmo_large.data import build_loader, merge_loader_states

# the 3-worker layout below exceeds this 2-core machine on purpose
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def _loader(synthetic, tokenizer, rank, world=2, workers=2, batch_size=7, shards=None, kind="image_text", **kw):
    args = dict(tokenizer=tokenizer, image_size=64, max_text_len=32, rank=rank, world_size=world,
                num_workers=workers, seed=7, shuffle_buffer=16, prefetch_factor=2)
    if kind == "vqa":  # the fine-tuning kind with the most fields (soft targets, human answers)
        args.update(answers=synthetic["vqa"]["answers"], augment="spec")
        shards = shards or synthetic["vqa"]["train_shards"]
    return build_loader(kind, shards or synthetic["image_text"]["train"], batch_size, **{**args, **kw})


def _run(loader, stop_after=None):
    batches = []
    for i, batch in enumerate(loader):
        batches.append(batch)
        if stop_after is not None and i + 1 == stop_after:
            break
    return batches


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_is_exact_with_2_workers_and_2_ranks(synthetic, tokenizer, rank):
    full = _run(_loader(synthetic, tokenizer, rank))
    assert len(full) == 120 // 7
    for cut in (1, 6, 11, len(full) - 1):
        first = _loader(synthetic, tokenizer, rank)
        head = _run(first, stop_after=cut)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = _loader(synthetic, tokenizer, rank)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # the trainer's usual call: must not rewind a restored epoch
        tail = _run(resumed)
        assert _keys(head + tail) == _keys(full), f"cut after {cut} batches"
        # the very same tensors (augmentation and masks are per-sample seeded)
        for name in ("image", "mlm_ids", "text_ids"):
            assert torch.equal(tail[0][name], full[cut][name])
        assert resumed.epoch == 1, "a finished epoch moves the state to the next one"


def test_ranks_together_cover_the_epoch_once(synthetic, tokenizer):
    folder = os.path.dirname(synthetic["image_text"]["train"])
    expected = set()
    for name in os.listdir(folder):
        if name.startswith("train-") and name.endswith(".tar"):
            expected |= set(tar_records(os.path.join(folder, name)))
    seen = []
    for rank in (0, 1):
        first = _loader(synthetic, tokenizer, rank, drop_last=False)
        head = _run(first, stop_after=4)
        second = _loader(synthetic, tokenizer, rank, drop_last=False)
        second.load_state_dict(first.state_dict())
        seen += _keys(head + _run(second))
    assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected


@pytest.mark.parametrize("kind, rank, world, batch_size", [("image_text", 1, 2, 7), ("vqa", 0, 1, 4)])
def test_in_process_loader_resumes_exactly(synthetic, tokenizer, kind, rank, world, batch_size):
    kw = dict(workers=0, world=world, batch_size=batch_size, kind=kind)
    full = _run(_loader(synthetic, tokenizer, rank, **kw))
    first = _loader(synthetic, tokenizer, rank, **kw)
    head = _run(first, stop_after=5)
    second = _loader(synthetic, tokenizer, rank, **kw)
    second.load_state_dict(first.state_dict())
    tail = _run(second)
    assert _keys(head) + _keys(tail) == _keys(full)
    for name in ("image", "text_ids", "vqa_targets", "vqa_answers"):  # augmentation included
        if name in full[0]:
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                       for a, b in zip([b[name] for b in head + tail], [b[name] for b in full])), name


def test_changed_layout_finishes_the_epoch_at_shard_granularity(synthetic, tokenizer):
    folder = os.path.dirname(synthetic["image_text"]["train"])
    shard_keys = {os.path.join(folder, n): set(tar_records(os.path.join(folder, n)))
                  for n in os.listdir(folder) if n.startswith("train-") and n.endswith(".tar")}
    all_keys = set().union(*shard_keys.values())
    states, consumed = [], []
    for rank in (0, 1):
        # a small shuffle buffer lets shards finish early (large buffers keep stragglers around)
        loader = _loader(synthetic, tokenizer, rank, drop_last=False, shuffle_buffer=4)
        consumed += _keys(_run(loader, stop_after=10))
        states.append(loader.state_dict())
    merged = json.loads(json.dumps(merge_loader_states(states)))
    completed = {p for w in merged["workers"].values() for p in w["completed"]}
    assert completed, "10 of 17 batches per rank complete some shards"
    for path in completed:  # independent check: a completed shard was delivered in full
        assert shard_keys[path] <= set(consumed)
    with pytest.raises(ValueError, match="merge_loader_states"):
        _loader(synthetic, tokenizer, 0, world=1, workers=3).load_state_dict(states[0])
    new = _loader(synthetic, tokenizer, 0, world=1, workers=3, drop_last=False, shuffle_buffer=4)
    new.load_state_dict(merged)
    rest = _keys(_run(new))
    done_keys = set().union(*(shard_keys[p] for p in completed))
    assert not set(rest) & done_keys, "completed shards are not read again"
    assert set(consumed) | set(rest) == all_keys and len(rest) == len(set(rest))
    assert len(rest) == len(all_keys) - len(done_keys)


def _endless(loader, count):
    """The trainer's iteration (training/trainer.endless): passes over the loader, `count` batches."""
    out = []
    while len(out) < count:
        before = len(out)
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                return out
        assert len(out) > before, "a pass produced no batch"
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [8, 7])  # 120 samples per rank: 15 batches exactly / 17 and 1 dropped
def test_state_saved_on_the_last_batch_of_an_epoch_resumes_into_the_next_epoch(synthetic, tokenizer, workers,
                                                                               batch_size):
    per_epoch = 120 // batch_size
    full = _endless(_loader(synthetic, tokenizer, 0, workers=workers, batch_size=batch_size), per_epoch + 4)
    first = _loader(synthetic, tokenizer, 0, workers=workers, batch_size=batch_size)
    head = _endless(first, per_epoch)  # stopped right after the epoch's last batch, as a checkpoint would
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _loader(synthetic, tokenizer, 0, workers=workers, batch_size=batch_size)
    resumed.load_state_dict(state)
    tail = _endless(resumed, 4)
    assert _keys(head) == _keys(full[:per_epoch])
    assert _keys(tail) == _keys(full[per_epoch:]), "the next epoch's batches, as uninterrupted"
    for name in ("image", "mlm_ids"):
        assert torch.equal(tail[0][name], full[per_epoch][name])
    assert resumed.epoch == 1


def test_changed_shards_seed_or_kind_are_refused_with_one_line(synthetic, tokenizer):
    from vlmo_large.errors import UserError
    state = _loader(synthetic, tokenizer, 0).state_dict()
    fewer = _loader(synthetic, tokenizer, 0, shards=synthetic["image_text"]["train"].replace("000007", "000006"))
    with pytest.raises(UserError, match=r"^resume: the data shard list \(data.shards\) changed since the checkpoint "
                                        r"\(8 shards, fingerprint \w+ then, 7 shards, fingerprint \w+ now\)"):
        fewer.load_state_dict(state)
    with pytest.raises(UserError, match=r"data seed changed .*\(7 then, 8 now\)"):
        _loader(synthetic, tokenizer, 0, seed=8).load_state_dict(state)
    with pytest.raises(UserError, match="^resume: the worker layout changed"):
        _loader(synthetic, tokenizer, 0, world=1, workers=3).load_state_dict(state)


def test_epoch_end_states_of_all_ranks_resume_into_the_next_epoch_under_a_new_layout(synthetic, tokenizer):
    states = []
    for rank in (0, 1):
        loader = _loader(synthetic, tokenizer, rank, batch_size=8)
        _endless(loader, 120 // 8)  # the whole epoch, stopped before the end markers are seen
        states.append(loader.state_dict())
    new = _loader(synthetic, tokenizer, 0, world=1, workers=3, batch_size=8)
    new.load_state_dict(merge_loader_states(states))
    fresh = _loader(synthetic, tokenizer, 0, world=1, workers=3, batch_size=8)
    fresh.set_epoch(1)
    assert _keys(_endless(new, 3)) == _keys(_endless(fresh, 3)), "epoch 1 under the new layout, exact"
