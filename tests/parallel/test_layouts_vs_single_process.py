"""TP=2 (ZeRO-1), DP=2 (ZeRO-3) and TP=2 x DP=2 (ZeRO-3) equal one process on stage 3 (vl): the
loss, every loss term and the weights after one clipped AdamW step through the trainer's DeepSpeed
engine. Real processes under torchrun, gloo, fp32, tiny preset, the same weights and global batch.

ITM negatives are drawn per data-parallel rank from a generator seeded by (seed, step, rank), so one
process drawing for the whole batch would pick others; the reference replays the negatives the
ranks drew (global indices, concatenated in rank order) and computes everything else itself.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel.layout_worker import GLOBAL_BATCH, OPTIM, SEED, TERMS, global_batch
from tests.training.conftest import REPO, run_torchrun
from vlmo_large.model import build_model
from vlmo_large.tasks import losses
from vlmo_large.training import objectives
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.training.optimization import param_groups

# tp, zero, processes; "one_zero0" is the one-process CPU config (DeepSpeed's gradient all-reduce off)
LAYOUTS = {"tp2_zero1": (2, 1, 2), "dp2_zero3": (1, 3, 2), "tp2_dp2_zero3": (2, 3, 4), "one_zero0": (1, 0, 1)}


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


def launch(weights, out, names) -> None:
    """layout_worker.py over `names`, all of one process count, in one torchrun session."""
    (nproc,) = {LAYOUTS[name][2] for name in names}
    layouts = ",".join(f"{LAYOUTS[name][0]}:{LAYOUTS[name][1]}" for name in names)
    run_torchrun([os.path.join(REPO, "tests/parallel/layout_worker.py"), str(weights), str(out), layouts],
                 nproc=nproc, timeout=300)


@pytest.fixture(scope="module")
def two_rank_results(weights, tmp_path_factory):
    """The two 2-process layouts, one after the other in one launch (one start-up for both)."""
    out = tmp_path_factory.mktemp("two_ranks")
    launch(weights, out, ["tp2_zero1", "dp2_zero3"])
    return out


@pytest.fixture(scope="module", params=[
    "tp2_zero1", "dp2_zero3", "one_zero0", pytest.param("tp2_dp2_zero3", marks=pytest.mark.slow)])
def layout_run(request, weights, tmp_path_factory):
    tp, zero, nproc = LAYOUTS[request.param]
    if nproc == 2:
        out = request.getfixturevalue("two_rank_results")
    else:
        out = tmp_path_factory.mktemp(request.param)
        launch(weights, out, [request.param])
    result = torch.load(out / f"tp{tp}_zero{zero}.pt", weights_only=True)
    result["reference"] = reference_step(str(weights), drawn_negatives(result["ranks"]))
    return result


def drawn_negatives(ranks: list[dict]) -> list[torch.Tensor]:
    """[image_for_text, text_for_image] over the global batch: TP rank 0's draws in data-parallel order."""
    firsts = sorted((r for r in ranks if r["tp"] == 0), key=lambda r: r["dp"])
    return [torch.cat([r["negatives"][call] for r in firsts]) for call in range(2)]


def reference_step(weights_path: str, negatives: list[torch.Tensor]):
    """One process, concatenated batch, the ranks' negatives -> (loss terms, state dict after the step).
    Trainable parameters without a gradient (the MIM head) get zeros, as DeepSpeed's ZeRO gives them."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    model.load_state_dict(load_file(weights_path))
    apply_stage_freezing(model, "vl")
    replay = iter(negatives)

    def replayed(logits, positives, generator=None, exclude=None):
        assert logits.shape == (GLOBAL_BATCH, GLOBAL_BATCH) and torch.equal(positives, torch.arange(GLOBAL_BATCH))
        return next(replay)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "sample_hard_negatives", replayed)
        out = objectives.TaskObjective(model, "vl", seed=SEED)(global_batch(model.cfg), step=0)
    assert next(replay, None) is None, "the reference made fewer ITM draws than the ranks"
    out["loss"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, OPTIM["grad_clip"])
    assert norm > OPTIM["grad_clip"], "the step should clip, so that the global gradient norm is tested too"
    torch.optim.AdamW(param_groups(model, OPTIM["weight_decay"]), lr=OPTIM["lr"], betas=OPTIM["betas"],
                      eps=OPTIM["eps"], fused=True).step()
    return {k: out[k].item() for k in TERMS}, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ranks_draw_valid_negatives_and_tp_ranks_agree(layout_run, request):
    tp, _, nproc = LAYOUTS[request.node.callspec.params["layout_run"]]
    ranks, dp = layout_run["ranks"], nproc // tp
    assert sorted((r["dp"], r["tp"]) for r in ranks) == [(d, t) for d in range(dp) for t in range(tp)]
    rows = GLOBAL_BATCH // dp
    for r in ranks:
        assert len(r["negatives"]) == 2, "one ITM draw per direction"
        positives = torch.arange(rows) + r["dp"] * rows
        for drawn in r["negatives"]:
            assert drawn.shape == (rows,) and not (drawn == positives).any()
        same_dp = next(o for o in ranks if o["dp"] == r["dp"] and o["tp"] == 0)
        # TP ranks of one data-parallel rank must build the same ITM batch
        assert all(torch.equal(a, b) for a, b in zip(r["negatives"], same_dp["negatives"]))
        for name in TERMS:
            assert r["losses"][name] == pytest.approx(same_dp["losses"][name], rel=1e-6), name
    if dp > 1:  # the negatives come from the gathered global batch, so the reference tests gathering
        assert any((d // rows != r["dp"]).any() for r in ranks for d in r["negatives"])


def test_loss_and_terms_match_one_process(layout_run):
    ref_losses, _ = layout_run["reference"]
    firsts = [r for r in layout_run["ranks"] if r["tp"] == 0]
    for name in TERMS:
        got = sum(r["losses"][name] for r in firsts) / len(firsts)  # the trainer's global-batch mean
        assert got == pytest.approx(ref_losses[name], rel=1e-5), name


def test_weights_after_one_step_match_one_process(layout_run, weights):
    _, ref_weights = layout_run["reference"]
    got, before = layout_run["weights"], load_file(str(weights))
    assert set(got) == set(ref_weights)
    moved = [n for n in ref_weights if not torch.equal(ref_weights[n], before[n])]
    assert len(moved) > 0.9 * len(ref_weights), "the step should move (almost) every weight"
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
