"""A pipeline stage built alone (VLMo on meta, then its stage materialised) holds exactly the tensors
of the whole-model build from the same seed, and nothing of the other stages (issue 13, item 2)."""
import math

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from vlmo_large.model import build_model
from vlmo_large.model.heads import ContrastiveHeads
from vlmo_large.model.initialization import materialize
from vlmo_large.model.tensor_parallel import placement, shard
from vlmo_large.parallel.layout import stage_of
from vlmo_large.parallel.stage_build import build_stage

SEED = 11


@pytest.fixture(scope="module")
def whole():
    return build_model("tiny", seed=SEED).state_dict()


@pytest.mark.parametrize("pp", [2, 3])
def test_every_stage_alone_equals_the_whole_build(whole, pp):
    depth = build_model("tiny", device="meta").cfg.depth
    covered = set()
    for stage in range(pp):
        model = build_stage("tiny", stage, pp, seed=SEED)
        for name, param in model.named_parameters():
            if stage_of(name, depth, pp) == stage:
                assert param.device.type == "cpu", name
                assert torch.equal(param.detach(), whole[name]), name
                covered.add(name)
            else:
                assert param.is_meta, f"{name} (stage {stage_of(name, depth, pp)}) materialised on stage {stage}"
    assert covered == set(whole)


def test_a_build_is_a_function_of_the_seed_alone():
    """Materialising in pieces, in any order, equals one build; another seed differs everywhere random."""
    torch.manual_seed(0)  # the global generator plays no part once the seed is given
    model = build_model("tiny", device="meta", seed=SEED)
    names = [name for name, _ in model.named_parameters()]
    materialize(model, names[1::2], "cpu")
    materialize(model, reversed(names[::2]), "cpu")
    torch.manual_seed(1)
    again = build_model("tiny", seed=SEED).state_dict()
    other = build_model("tiny", seed=SEED + 1).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again[name]), name
    random = [n for n in names if n.endswith(("qkv.weight", "fc1.weight", "cls_token", "mask_token"))]
    assert random and all(not torch.equal(again[n], other[n]) for n in random)


def test_contrastive_temperature_starts_at_0_07(whole):
    """The build and a standalone head (model/heads.py INIT_LOGIT_SCALE) both start at 1 / 0.07."""
    standalone = ContrastiveHeads(8).logit_scale.detach()
    for scale in (whole["itc.logit_scale"], whole["itc_vl.logit_scale"], standalone):
        assert scale.shape == (1,) and math.exp(scale.item()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert torch.equal(whole["itc.logit_scale"], standalone)


def test_unknown_names_are_refused():
    model = build_model("tiny", device="meta", seed=SEED)
    with pytest.raises(KeyError, match="backbone.blocks.99.norm1.weight"):
        materialize(model, ["backbone.blocks.99.norm1.weight"], "cpu")


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_slices_are_slices_of_the_whole_build(whole, rank):
    """A TP=2 rank's tensors are its shard (model/tensor_parallel.py, the loader's rule) of the TP=1 build.
    One process stands for rank `rank` of a two-rank group (torch's fake backend: no communication,
    which the initialisation needs none of)."""
    dist.init_process_group("fake", rank=rank, world_size=2, store=FakeStore())
    try:
        model = build_model("tiny", tp_group=dist.group.WORLD, seed=SEED)
        split = 0
        for name, param in model.named_parameters():
            where = placement(param)
            expected = whole[name] if where is None else shard(whole[name], *where, rank, 2)
            split += where is not None and param.shape != whole[name].shape
            assert torch.equal(param.detach(), expected), name
        assert split > 0  # the TP layers really hold halves
    finally:
        dist.destroy_process_group()
