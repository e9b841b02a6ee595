"""Single-process checks of the loss pieces, optimiser groups, schedule and checkpoint bookkeeping."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import randomize_
from vlmo_large.model import build_model
from vlmo_large.training import checkpointing
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.tasks.losses import mlm_loss, normalized_pixel_targets, sample_hard_negatives
from vlmo_large.training.optimization import WarmupDecay, param_groups


def test_hard_negatives_follow_softmax_without_the_positive():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [90.0, 0.0, -5.0, 1.0]])  # row 1: a dominant positive
    positives = torch.tensor([1, 0])
    rows = logits.repeat_interleave(20000, 0)
    drawn = sample_hard_negatives(rows, positives.repeat_interleave(20000), torch.Generator().manual_seed(0))
    for r in range(2):
        counts = torch.bincount(drawn[r * 20000:(r + 1) * 20000], minlength=4).double() / 20000
        expected = logits[r].double().exp()
        expected[positives[r]] = 0
        expected /= expected.sum()
        assert counts[positives[r]] == 0
        torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


def test_normalized_pixel_targets_match_unfold():
    images = torch.randn(2, 3, 32, 32)
    patches = F.unfold(images, 16, stride=16)              # [B, C*16*16, N], channel-major
    patches = patches.view(2, 3, 256, 4).permute(0, 3, 2, 1).reshape(2, 4, 768)  # pixel-major, channel last
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    torch.testing.assert_close(normalized_pixel_targets(images, 16), (patches - mean) / (var + 1e-6).sqrt())


def test_mlm_loss_equals_cross_entropy_over_all_positions():
    torch.manual_seed(0)
    model = randomize_(build_model("tiny"))
    hidden = torch.randn(2, 7, 64)
    labels = torch.full((2, 7), -100)
    labels[0, 1], labels[1, 3], labels[1, 6] = 5, 17, 1000
    full_logits = model.mlm_head(hidden)
    expected = F.cross_entropy(full_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(mlm_loss(model.mlm_head, hidden, labels), expected)


def test_param_groups_keep_frozen_out_and_exempt_norms_biases_scales_from_decay():
    model = build_model("tiny")
    apply_stage_freezing(model, "text_mlm")
    groups = {g["name"]: g for g in param_groups(model, 0.01, "vlmo_large")}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    assert {"backbone.blocks.0.rel_pos.table", "backbone.norm.weight", "backbone.blocks.0.experts.text.fc1.bias",
            "backbone.text_embeddings.position_embeddings.weight"} <= no_decay
    assert {"backbone.text_embeddings.word_embeddings.weight", "mlm_head.decoder.weight"} <= decay
    apply_stage_freezing(model, "vl")
    no_decay = {names[id(p)] for p in param_groups(model, 0.01, "vlmo_large")[1]["params"]}
    assert {"itc.logit_scale", "itc_vl.logit_scale", "backbone.patch_embed.cls_token", "backbone.blocks.0.gamma_1",
            "mim_head.mask_token"} <= no_decay


def test_mim_stage_trains_attention_vision_expert_patch_embedding_only():
    model = build_model("tiny")
    apply_stage_freezing(model, "mim")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.blocks.3.attn.qkv.weight" in trainable and "backbone.blocks.3.experts.imag.fc2.weight" in trainable
    assert "backbone.patch_embed.proj.weight" in trainable and "mim_head.predictor.weight" in trainable
    assert not {n for n in trainable if "experts.text" in n or "experts.vl" in n or "text_embeddings" in n
                or n.startswith(("itc", "mlm_head", "pooler", "itm_head"))}


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_warms_up_then_decays_to_the_floor(decay):
    s = WarmupDecay(warmup=4, total=14, decay=decay, min_ratio=0.1)
    assert [round(s(i), 6) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert s(4) == 1.0 and math.isclose(s(14), 0.1) and math.isclose(s(9), 0.55)
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


def test_resume_ignores_incomplete_checkpoints_and_prune_keeps_the_newest(tmp_path):
    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        tag = tmp_path / checkpointing.tag_for(step)
        tag.mkdir()
        if complete:
            (tag / checkpointing.MARKER).write_text("{}")
    assert checkpointing.find_resume_tag(str(tmp_path)) == (str(tmp_path), "step00000006")
    assert checkpointing.find_resume_tag(str(tmp_path / "step00000008")) is None
    checkpointing.prune(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004", "step00000006"]


def test_cuda_arch_names_deepspeed_cannot_parse_are_made_generic(monkeypatch):
    from vlmo_large.training.engine import _plain_cuda_arch_list
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a;10.0f+PTX")
    _plain_cuda_arch_list()
    import os
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"


def test_hard_negatives_of_non_finite_rows_are_uniform_over_the_other_columns():
    """A diverged model (lr=10000) gives inf/NaN similarities: sampling must not crash (the loss
    comes out non-finite and the trainer stops on it)."""
    n = 20000
    logits = torch.tensor([[1.0, float("nan"), 0.0, 2.0], [float("inf"), float("inf"), 0.0, 1.0],
                           [float("-inf")] * 4, [1e38, -1e38, float("inf"), float("-inf")]])
    positives = torch.tensor([0, 1, 2, 3])
    drawn = sample_hard_negatives(logits.repeat_interleave(n, 0), positives.repeat_interleave(n),
                                  torch.Generator().manual_seed(0))
    for r in range(4):
        counts = torch.bincount(drawn[r * n:(r + 1) * n], minlength=4).double() / n
        expected = torch.full((4,), 1 / 3, dtype=torch.float64)
        expected[positives[r]] = 0
        torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)


def test_itm_pairs_can_skip_candidates_with_the_positives_text():
    from vlmo_large.tasks.losses import itm_pairs
    B, T = 6, 5
    ids = torch.arange(B * T).view(B, T)
    ids[3] = ids[0]  # texts 0, 3 and 5 are the same caption
    ids[5] = ids[0]
    batch = {"image": torch.arange(B).float().view(B, 1, 1, 1), "text_ids": ids, "text_mask": torch.ones(B, T)}
    logits = torch.zeros(B, B)
    logits[0, 3] = logits[3, 0] = logits[5, 0] = logits[0, 5] = 30.0  # the identical caption dominates
    same = {0: {3, 5}, 3: {0, 5}, 5: {0, 3}}
    for skip in (False, True):
        hits = 0
        for seed in range(200):
            pairs = itm_pairs(batch, logits, logits, generator=torch.Generator().manual_seed(seed),
                              skip_identical_text=skip)
            for row in range(B):
                for col in (int(pairs["image_for_text"][row]), int(pairs["text_for_image"][row])):
                    assert col != row
                    hits += col in same.get(row, ())
        if skip:
            assert hits == 0
        else:
            assert hits > 1000, "without the option the identical caption is drawn nearly always"


def test_the_config_switch_reaches_the_vl_objective(monkeypatch):
    from tests.training.common import run_config
    from vlmo_large.tasks import vl
    from vlmo_large.tasks.loss_weights import LossWeights
    from vlmo_large.training import objectives
    assert run_config("/tmp/x").loss.itm_skip_identical_text is False, "off by default"
    cfg = run_config("/tmp/x", **{"loss.itm_skip_identical_text": True})
    model = build_model("tiny")
    B, T = 4, 8
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (B, T), generator=gen)
    ids[1] = ids[0]  # texts 0 and 1 are the same caption
    batch = {"image": torch.randn(B, 3, 64, 64, generator=gen), "text_ids": ids, "text_mask": torch.ones(B, T, dtype=torch.long),
             "mlm_ids": ids.clone(), "mlm_labels": torch.full((B, T), -100)}
    drawn = []
    real = vl.itm_pairs

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        drawn.append((int(out["image_for_text"][0]), int(out["text_for_image"][0])))
        return out

    monkeypatch.setattr(vl, "itm_pairs", recording)  # where the vl task looks it up
    for skip in (cfg.loss.itm_skip_identical_text, False):
        drawn.clear()
        objective = objectives.TaskObjective(model, "vl", LossWeights(itm_skip_identical_text=skip), seed=1)
        with torch.no_grad():
            for step in range(12):
                objective(batch, step)
        picked_identical = sum(1 in pair for pair in drawn)
        assert (picked_identical == 0) if skip else (picked_identical > 0)
