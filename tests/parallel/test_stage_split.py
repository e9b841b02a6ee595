"""One stage-split rule: the pipeline's layer bounds, the checkpoint splitter's files and the memory
estimator's per-stage counts all cut where parallel/layout.py says. Expected splits are written out."""
import pytest

from vlmo_large.config import get_preset
from vlmo_large.memory import params_per_stage
from vlmo_large.model import build_model
from vlmo_large.parallel.layout import pipeline_parts, stage_blocks, stage_of


@pytest.mark.parametrize("depth, pp, sizes", [(4, 1, [4]), (4, 2, [2, 2]), (4, 3, [1, 1, 2]), (4, 4, [1, 1, 1, 1]),
                                              (24, 5, [4, 5, 5, 5, 5]), (12, 4, [3, 3, 3, 3])])
def test_blocks_split_contiguous_and_as_even_as_the_depth_allows(depth, pp, sizes):
    blocks = stage_blocks(depth, pp)
    assert [len(b) for b in blocks] == sizes
    assert [i for b in blocks for i in b] == list(range(depth))


def test_pipeline_layer_bounds_hold_the_embeddings_first_and_the_head_last():
    # layers: 0 embeddings, 1 + i block i, depth + 1 norm and heads
    assert pipeline_parts(4, 2) == [0, 3, 6]        # [emb, b0, b1] [b2, b3, head]
    assert pipeline_parts(4, 3) == [0, 2, 3, 6]     # [emb, b0] [b1] [b2, b3, head]
    assert pipeline_parts(4, 1) == [0, 6]


def test_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError, match="cannot split 4 blocks into 5 pipeline stages"):
        stage_blocks(4, 5)


def test_names_go_to_the_stage_that_runs_them():
    assert stage_of("backbone.patch_embed.proj.weight", 4, 3) == 0
    assert stage_of("mim_head.mask_token", 4, 3) == 0  # an input of the embeddings
    assert stage_of("backbone.blocks.0.rel_pos.table", 4, 3) == 0
    assert stage_of("backbone.blocks.1.attn.qkv.weight", 4, 3) == 1
    assert stage_of("backbone.blocks.3.experts.vl.fc1.weight", 4, 3) == 2
    assert stage_of("backbone.norm.weight", 4, 3) == 2 and stage_of("itm_head.weight", 4, 3) == 2


def test_memory_estimator_counts_what_each_stage_holds():
    cfg = get_preset("tiny")
    params = dict(build_model(cfg, device="meta").named_parameters())

    def count(prefixes):
        return sum(p.numel() for n, p in params.items() if n.startswith(prefixes))

    first = ("backbone.text_embeddings.", "backbone.patch_embed.", "backbone.modality_embed.", "mim_head.mask_token")
    last = ("backbone.norm.", "itc.", "itc_vl.", "pooler.", "itm_head.", "mlm_head.", "mim_head.predictor.")
    expected = [count(first + ("backbone.blocks.0.",)), count(("backbone.blocks.1.",)),
                count(("backbone.blocks.2.", "backbone.blocks.3.") + last)]
    assert sum(expected) == sum(p.numel() for p in params.values())
    assert params_per_stage(cfg, 1, 3) == expected
