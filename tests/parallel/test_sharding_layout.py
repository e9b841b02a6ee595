"""shard/unshard are inverse, and the stride layouts put whole heads on each rank."""
import torch

from vlmo_large.model.tensor_parallel import shard, unshard


def test_shard_unshard_round_trip():
    full = torch.arange(4 * 6 * 5).reshape(24, 5).float()
    for world in (1, 2, 4):
        for stride in (1, 3):
            if 24 % (stride * world):
                continue
            pieces = [shard(full, 0, stride, r, world) for r in range(world)]
            assert torch.equal(unshard(pieces, 0, stride), full)


def test_qkv_stride_gives_each_rank_its_heads_of_q_k_and_v():
    heads, head_dim, dim = 4, 2, 8
    rows = torch.arange(3 * dim)  # row index of the full [3D, D] qkv weight: q rows, then k, then v
    local = shard(rows, 0, 3, rank=1, world=2)
    # rank 1 holds heads 2 and 3: q rows 4..7, k rows 12..15, v rows 20..23
    assert local.tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]


def test_relative_table_stride_gives_each_rank_its_heads_in_every_layer():
    depth, heads = 3, 4
    cols = torch.arange(depth * heads)[None]  # column = layer * heads + head
    local = shard(cols, 1, depth, rank=0, world=2)
    assert local.tolist() == [[0, 1, 4, 5, 8, 9]]
