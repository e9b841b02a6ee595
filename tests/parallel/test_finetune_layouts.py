"""Fine-tuning at TP=2 (ZeRO-1), DP=2 (ZeRO-3) and PP=2 (ZeRO-1) equals one process, for each task
(vqa, nlvr2, retrieval): the loss, each term and every weight after one clipped AdamW step through
the trainer (its heads, --init, DeepSpeed engine; the new heads at their own lr). Real processes
under torchrun, gloo, fp32, tiny preset, the same weights and global batch; one 2-process launch
runs every layout and task (finetune_worker.py). The reference is computed here: one process, the
concatenated batch (retrieval's global ITC over all of it), hand-made lr groups."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import randomize_
from tests.parallel.finetune_worker import HEAD_LR_MULT, OPTIM, TASKS, global_batch, task_model
from tests.parallel.layout_worker import SEED
from tests.training.conftest import REPO, run_torchrun
from vlmo_large.tasks.registry import get_task
from vlmo_large.training.freezing import apply_stage_freezing
from vlmo_large.training.objectives import TaskObjective
from vlmo_large.training.optimization import param_groups

LAYOUTS = {"tp2_zero1": (2, 1, 1), "dp2_zero3": (1, 1, 3), "pp2_zero1": (1, 2, 1)}  # tp, pp, zero; 2 processes


HEADS = {"vqa": ("vqa_classifier",), "nlvr2": ("nlvr2_classifier",), "retrieval": ()}  # the tasks' new modules


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """<task>.safetensors: the randomised tiny model with the task's heads (and NLVR2's third row)."""
    folder = tmp_path_factory.mktemp("finetune_weights")
    for name in TASKS:
        model = randomize_(task_model(name), seed=5)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def references(weights_dir):
    return {name: reference_step(name, str(weights_dir / f"{name}.safetensors")) for name in TASKS}


@pytest.fixture(scope="module")
def launched(weights_dir, tmp_path_factory):
    """Every layout, one after the other, in one torchrun launch of 2 processes (one start-up)."""
    out = tmp_path_factory.mktemp("finetune_layouts")
    layouts = ",".join(":".join(map(str, LAYOUTS[name])) for name in LAYOUTS)
    run_torchrun([os.path.join(REPO, "tests/parallel/finetune_worker.py"), str(weights_dir), str(out), layouts],
                 nproc=2, timeout=600)
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_run(request, launched):
    tp, pp, zero = LAYOUTS[request.param]
    return request.param, torch.load(launched / f"tp{tp}_pp{pp}_zero{zero}.pt", weights_only=True)


def reference_step(name: str, weights_path: str):
    """One process, the global batch -> (terms, state dict after the step, names that got a gradient).
    Trainable parameters without a gradient get zeros, as DeepSpeed gives them."""
    model = task_model(name).train()
    model.load_state_dict(load_file(weights_path))
    apply_stage_freezing(model, name)
    out = TaskObjective(model, name, seed=SEED)(global_batch(name, model.cfg), step=0)
    out["loss"].backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    graded = {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}
    for _, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], OPTIM["grad_clip"])
    assert norm > OPTIM["grad_clip"], "the step should clip, so that the global gradient norm is tested too"
    head_params = {id(p) for head in HEADS[name] for p in getattr(model, head).parameters()}
    groups = []
    for group in param_groups(model, OPTIM["weight_decay"]):
        for is_head in (False, True):
            params = [p for p in group["params"] if (id(p) in head_params) == is_head]
            if params:
                groups.append({"params": params, "weight_decay": group["weight_decay"],
                               "lr": OPTIM["lr"] * (HEAD_LR_MULT if is_head else 1.0)})
    torch.optim.AdamW(groups, lr=OPTIM["lr"], betas=OPTIM["betas"], eps=OPTIM["eps"], fused=True).step()
    terms = {k: out[k].item() for k in ("loss", *get_task(name).terms)}
    return terms, {k: v.detach().clone() for k, v in model.state_dict().items()}, graded


@pytest.mark.parametrize("name", TASKS)
def test_terms_match_one_process_on_every_rank(layout_run, references, name):
    layout, results = layout_run
    tp, pp, _ = LAYOUTS[layout]
    ranks = results[name]["ranks"]
    assert sorted((r["dp"], r["tp"], r["pp"]) for r in ranks) == \
        [(d, t, s) for d in range(2 // (tp * pp)) for t in range(tp) for s in range(pp)]
    ref_terms, _, _ = references[name]
    for r in ranks:  # train_step's terms: means over the data-parallel ranks, on every rank (every stage)
        assert set(r["terms"]) == set(ref_terms)
        for term, value in ref_terms.items():
            assert r["terms"][term] == pytest.approx(value, rel=1e-5), (layout, name, term, r["dp"], r["tp"])


@pytest.mark.parametrize("name", TASKS)
def test_weights_after_one_step_match_one_process(layout_run, references, weights_dir, name):
    layout, results = layout_run
    _, ref_weights, graded = references[name]
    got, before = results[name]["weights"], load_file(str(weights_dir / f"{name}.safetensors"))
    assert set(got) == set(ref_weights)
    assert all(any(n.startswith(f"{head}.") for n in graded) for head in HEADS[name]), "the new heads train"
    assert all(not torch.equal(ref_weights[n], before[n]) for n in graded), "a tensor with a gradient did not move"
    for tensor_name in sorted(got):
        torch.testing.assert_close(got[tensor_name], ref_weights[tensor_name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{layout} {name} {tensor_name}: {m}")
