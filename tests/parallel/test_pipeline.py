"""DeepSpeed pipeline (PP=2, and TP=2 x PP=2) equals one process: losses, loss terms and weights after
one ZeRO-1 AdamW step with gradient clipping, and held-out evaluation's loss terms on the starting
weights, for pretraining stages vl (ITC over the global batch, ITM with hard negatives, MLM), mim
and text_mlm; and the held-out metrics of vl, nlvr2 and vqa (Task.heldout_metrics: retrieval R@k,
ITM/MLM accuracy, nlvr2_acc, vqa_score/vqa_acc). Real processes under torchrun, gloo, fp32, tiny
preset; the reference is training/'s TaskObjective (and Task.heldout_metrics) on plain VLMo in this process."""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel.pipeline_reference import reference_fine_tuning_heldout, reference_heldout, reference_step
from tests.parallel.pipeline_worker import (FINE_TUNING, METRIC_TASKS, fine_tuning_batches, fine_tuning_model,
                                            stage_batches)
from tests.training.conftest import REPO, run_torchrun
from vlmo_large.model import build_model
from vlmo_large.tasks.registry import get_task
from vlmo_large.training.freezing import is_trainable

LAYOUTS = {"pp2": (1, 2), "tp2_pp2": (2, 2)}
STAGES = ("vl", "mim", "text_mlm")


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


@pytest.fixture(scope="module")
def references(weights):
    return {stage: reference_step(str(weights), stage) for stage in STAGES}


@pytest.fixture(scope="module", params=[
    "pp2", pytest.param("tp2_pp2", marks=pytest.mark.slow)])
def pipeline_run(request, weights, tmp_path_factory):
    tp, pp = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    run_torchrun([os.path.join(REPO, "tests/parallel/pipeline_worker.py"), str(weights), str(out), str(tp), str(pp)],
                 nproc=tp * pp, timeout=300)
    runs = {stage: torch.load(out / f"{stage}.pt", weights_only=True) for stage in (*STAGES, FINE_TUNING)}
    metrics = {name: torch.load(out / f"{name}_metrics.pt", weights_only=True) for name in METRIC_TASKS}
    return {**runs, "metrics": {"vl": runs["vl"]["metrics"], **metrics}}


@pytest.mark.parametrize("stage", STAGES)
def test_losses_and_terms_match_one_process(pipeline_run, references, stage):
    ref_losses, _ = references[stage]
    got = pipeline_run[stage]["losses"]
    assert set(got) == set(ref_losses), (sorted(got), sorted(ref_losses))
    for name, ref in ref_losses.items():
        assert got[name] == pytest.approx(ref, rel=1e-5), name


@pytest.mark.parametrize("stage", STAGES)
def test_heldout_terms_match_one_process(pipeline_run, weights, stage):
    """PipelineStep.evaluate (held-out evaluation at PP): computed on the last stage, every rank
    gets them; rank 0 (first stage) saved these."""
    ref = reference_heldout(str(weights), stage)
    got = {name: float(value) for name, value in pipeline_run[stage]["heldout"].items()}
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


def test_a_fine_tuning_task_written_for_one_process_runs_in_the_pipeline(pipeline_run):
    """nlvr2 (tasks/nlvr2.py: inputs/score only) at PP: each rank built only its stage; the held-out
    terms equal one process's whole build."""
    ref = reference_fine_tuning_heldout()
    got = {name: float(value) for name, value in pipeline_run[FINE_TUNING].items()}
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("name", ("vl", *METRIC_TASKS))
def test_heldout_metrics_match_one_process(pipeline_run, weights, name):
    """Task.heldout_metrics at PP (held-out evaluation: PipelineStep.heldout_parts, the last stage's
    Task.heldout_batch on every rank, then Task.heldout_reduce) equals one process's on the same
    weights and batches: vl's zero-shot retrieval, ITM and MLM accuracy (evaluate_pretraining),
    nlvr2_acc, vqa_score and the official vqa_acc."""
    ref = reference_metrics(str(weights), name)
    got = pipeline_run["metrics"][name]
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def reference_metrics(weights_path: str, name: str) -> dict:
    """Task.heldout_metrics of `name` in one process, in eval mode: stage vl on the worker's plain
    weights and micro-batches, a fine-tuning task on the worker's whole build and batches."""
    if name == "vl":
        model = build_model("tiny").eval()
        model.load_state_dict(load_file(weights_path))
        return get_task(name).heldout_metrics(model, stage_batches(model.cfg, name))
    task = get_task(name)
    return task.heldout_metrics(fine_tuning_model(build_model, task).eval(), fine_tuning_batches(task))


@pytest.mark.parametrize("stage", STAGES)
def test_weights_after_one_step_match_one_process(pipeline_run, references, weights, stage):
    _, ref_weights = references[stage]
    got = pipeline_run[stage]["weights"]
    before = load_file(str(weights))
    # the pipeline holds everything that trains (stage vl never runs the MIM head, so it is not built
    # there; freezing.py trains it in vl, where weight decay alone moves it)
    ref_moved = {n for n, t in ref_weights.items() if not torch.equal(t, before[n])}
    unused = {n for n in ref_moved if stage == "vl" and n.startswith("mim_head.")}
    assert ref_moved - unused <= set(got), sorted(ref_moved - unused - set(got))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, ref_weights[name], rtol=1e-5, atol=1e-6, msg=name)
        if not is_trainable(stage, name):
            assert torch.equal(tensor, before[name]), name  # frozen stays frozen
