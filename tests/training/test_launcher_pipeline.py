"""The launcher with pipeline parallelism (parallel.pp=2, ZeRO-1, 2 ranks) on the synthetic shards:
per-step losses and the held-out loss terms and metrics after the last step equal the non-pipeline
run (PP=1, one rank, the same global batch), and a run of 4 steps equals 2 steps + `--resume auto`
+ 2 steps (data position, RNG, optimizer, schedule)."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from tests.conftest import migrated_store, seed_store
from tests.training.conftest import REPO, StartedTorchrun, run_torchrun
from vlmo_large.formats.rel_pos_tables import split_tables

LAUNCHER = os.path.join(REPO, "launchers", "pretrain.py")
DS = os.path.join(REPO, "ds_configs", "cpu_fp32_zero1.json")
TERMS = ("loss", "itc", "itc_vl", "itm", "mlm", "itm_acc", "logit_scale")


def heldout_args(data: dict) -> list[str]:
    """Held-out evaluation after step 4 only (the runs' last step: nothing trains after it)."""
    return ["eval_every=4", f"eval.shards={data['image_text']['val']}", "eval.batches=2"]


def eval_line(log: str, step: int) -> dict:
    """The progress line "eval step N: k=v ..." as {k: v}."""
    line = next(line for line in log.splitlines() if line.startswith(f"eval step {step}: "))
    return {k: float(v) for k, v in (item.split("=") for item in line.split(": ", 1)[1].split())}


def launcher_args(out, data: dict, *extra, ds: str = DS) -> list[str]:
    """4 steps of stage vl, micro-batch 4, checkpoints every 2 steps."""
    return [LAUNCHER, "--ds_config", ds, "preset=tiny", "stage=vl", f"output_dir={out}",
            f"data.shards={data['image_text']['train']}", f"data.tokenizer={data['tokenizer']}",
            "data.augment=light", "batch.micro=4", "schedule.steps=4", "schedule.warmup=1",
            "checkpoint.every=2", "checkpoint.keep=2", "log_every=1", *extra]


def launch(out, data: dict, nproc: int, *extra, store, ds: str = DS) -> list[dict]:
    """launcher_args run to the end, its MLflow store a copy of `store`; -> metrics.jsonl and the console output."""
    seed_store(store, out / "mlflow.db")
    result = run_torchrun(launcher_args(out, data, *extra, ds=ds), nproc=nproc, timeout=300)
    return metrics(out), result.stdout + result.stderr


def pipeline_run(tmp_path_factory) -> dict:
    """The PP=2 launcher run, once per session (also read by tests/checkpoint/test_pipeline_to_plain.py):
    {"out": output dir, "data": synthetic dataset, "history": metrics, "log": console output}."""
    root = tmp_path_factory.getbasetemp() / "pipeline_launch"
    done = root / "run.json"
    if not done.exists():
        from vlmo_large.data.synthetic import make_synthetic
        shutil.rmtree(root, ignore_errors=True)
        data = make_synthetic(str(root / "data"), num_pairs=64, num_images=8, num_texts=8, num_val=4,
                              num_retrieval=2, num_vqa_images=2, num_nlvr2=2, samples_per_shard=16)
        history, log = launch(root / "pp2", data, 2, "parallel.pp=2", *heldout_args(data),
                              store=migrated_store(tmp_path_factory))
        done.write_text(json.dumps({"out": str(root / "pp2"), "data": data, "history": history, "log": log},
                                   default=str))
    return json.loads(done.read_text())


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    return pipeline_run(tmp_path_factory)


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def after_pp2(pp2, tmp_path_factory):
    """The two runs that follow the PP=2 run, started together (their start-ups overlap on 2 cores):
    the PP=1 reference on one rank, and the PP=2 resume from the checkpoint directory as a job that
    ended after step 2 left it. -> {name: (output folder, started run)}."""
    root = tmp_path_factory.mktemp("after_pp2")
    # the resume's folder: the PP=2 run's checkpoints without step 4
    shutil.copytree(os.path.join(pp2["out"], "checkpoints"), root / "resume" / "checkpoints")
    shutil.rmtree(root / "resume" / "checkpoints" / "step00000004")
    for name in ("pp1", "resume"):
        seed_store(migrated_store(tmp_path_factory), root / name / "mlflow.db")
    runs = {"pp1": (root / "pp1", StartedTorchrun(launcher_args(root / "pp1", pp2["data"], *heldout_args(pp2["data"])),
                                                  root / "pp1_console", nproc=1, timeout=300)),
            "resume": (root / "resume", StartedTorchrun(launcher_args(root / "resume", pp2["data"], "parallel.pp=2",
                                                                      "--resume", "auto"),
                                                        root / "resume_console", nproc=2, timeout=300))}
    yield runs
    for _, started in runs.values():
        started.proc.kill()


def test_pipeline_losses_equal_the_non_pipeline_run(pp2, after_pp2):
    # PP=2 on 2 ranks has DP=1: its global batch is one rank's micro-batch, as one PP=1 process
    out, started = after_pp2["pp1"]
    result = started.result()
    reference = metrics(out)
    got = pp2["history"]
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for ref, mine in zip(reference, got):
        assert set(mine) == set(ref) == {"step", *TERMS}
        for key in TERMS:
            assert mine[key] == pytest.approx(ref[key], rel=1e-5), (key, ref, mine)
    log = pp2["log"]
    assert "pipeline: 2 stages x TP 1 x DP 1" in log and "step 4/4 " in log
    # held-out evaluation through the pipeline: its loss terms and the task's metrics (zero-shot
    # retrieval, ITM and MLM accuracy: Task.heldout_reduce of the last stage's parts) are the one-process run's
    heldout, ref_heldout = eval_line(log, 4), eval_line(result.stdout + result.stderr, 4)
    assert set(heldout) == set(ref_heldout) >= {*TERMS, "tr_r1", "ir_r1", "itm_pos_acc", "mlm_acc"}
    for key, value in ref_heldout.items():
        assert heldout[key] == pytest.approx(value, abs=1e-4), key  # printed to 4 decimals


def test_pipeline_checkpoints_and_export(pp2):
    ckpt = os.path.join(pp2["out"], "checkpoints")
    assert sorted(t for t in os.listdir(ckpt) if t.startswith("step")) == ["step00000002", "step00000004"]
    assert open(os.path.join(ckpt, "latest")).read() == "step00000004"
    files = os.listdir(os.path.join(ckpt, "step00000004"))
    assert "COMPLETE" in files and "layer_05-model_00-model_states.pt" in files
    exported = load_file(os.path.join(pp2["out"], "export", "model.safetensors"))
    from vlmo_large.model import build_model
    assert set(split_tables(exported)) == set(build_model("tiny", device="meta").state_dict())
    with open(os.path.join(pp2["out"], "export", "config.json")) as f:
        assert json.load(f)["name"] == "tiny"


def test_pipeline_resume_equals_the_uninterrupted_run(pp2, after_pp2):
    out, started = after_pp2["resume"]
    result = started.result()
    resumed, log = metrics(out), result.stdout + result.stderr
    assert "resumed from step00000002 at step 2" in log
    assert [h["step"] for h in resumed] == [3, 4]
    for full, mine in zip(pp2["history"][2:], resumed):
        for key in TERMS:
            assert abs(full[key] - mine[key]) < 1e-6, (key, full, mine)
    a = load_file(str(out / "export" / "model.safetensors"))
    b = load_file(os.path.join(pp2["out"], "export", "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
