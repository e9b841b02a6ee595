"""The launcher logs a run to MLflow's embedded store: params, per-step and held-out metrics, the
config files, the retrieval-examples figure and the final status (eval_every without a split is
refused in test_config_errors.py).
Across launches: a two-node run is one MLflow run with both nodes' system metrics and each config key
logged once, `--resume auto` continues that run, and so does the launch after a kill -9."""
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from tests.tracking.conftest import free_port, seed_store
from tests.training.conftest import REPO
from vlmo_large.tracking import flatten_params
from vlmo_large.tracking.run_record import RECORD_NAME
from vlmo_large.training.run_config import load_run_config

LAUNCHER = os.path.join(REPO, "launchers", "pretrain.py")
DS = os.path.join(REPO, "ds_configs", "cpu_fp32.json")


def _args(out, dataset, *extra):
    return [sys.executable, LAUNCHER, "--ds_config", DS, "preset=tiny", "stage=vl", f"output_dir={out}",
            f"data.shards={dataset['image_text']['train']}", f"data.tokenizer={dataset['tokenizer']}",
            "data.augment=light", "batch.micro=4", "schedule.steps=4", "schedule.warmup=1",
            "checkpoint.every=0", "log_every=2", *extra]


def _run(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_run_is_tracked_in_the_embedded_store(tmp_path, dataset):
    out = tmp_path / "run"
    result = _run(_args(out, dataset, "eval_every=2", f"eval.shards={dataset['image_text']['val']}",
                        "eval.batches=2", f"eval.retrieval_shards={dataset['retrieval']['shards']}",
                        f"eval.retrieval_json={dataset['retrieval']['json']}"))
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["config.preset"] == "tiny" and run.info.run_name == "tiny-vl-run"
    for key in ("loss", "itc", "itc_vl", "itm", "mlm", "lr", "samples_per_s", "eval/mlm_acc", "eval/itm_acc",
                "eval/tr_r1", "eval/ir_r5", "eval/heldout_tr_r1", "eval/loss"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cpu_fp32.json", "metrics.jsonl", "run_setup.json", "figures"} <= artifacts
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert figures == ["figures/retrieval_examples_step000002.png", "figures/retrieval_examples_step000004.png"]


RANDOM_RUN = ["preset=tiny", "stage=vl", "data.source=random", "batch.micro=2", "schedule.warmup=1",
              "checkpoint.every=2", "log_every=1"]


def _runs(out):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _loss_steps(out) -> set[int]:
    client, runs = _runs(out)
    return {m.step for run in runs for m in client.get_metric_history(run.info.run_id, "loss")}


def _two_nodes(out, *extra, timeout=600):
    """Two torchrun "nodes" of one rank each on loopback: node 1's local rank 0 is not rank 0."""
    port, env = free_port(), dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true",
                                  MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", LAUNCHER,
                               "--ds_config", DS, f"output_dir={out}", *RANDOM_RUN, *extra],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the group this test started
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)


@pytest.mark.timeout(1500)
def test_two_nodes_one_run_with_system_metrics_and_resume_continues_it(tmp_path, store_template):
    out = tmp_path / "run"
    seed_store(store_template, out / "mlflow.db")  # the run starts at once instead of after migrations
    _two_nodes(out, "schedule.steps=8")
    client, (run,) = _runs(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-vl-run"
    for node in ("node_0", "node_1"):
        assert 0 <= run.data.metrics[f"system/{node}/cpu_utilization_percentage"] <= 100
        assert run.data.metrics[f"system/{node}/system_memory_usage_megabytes"] > 0
    # every config key once, as config.<key>; the rest is the DeepSpeed config, preset, layout, commit
    cfg = load_run_config(None, [f"output_dir={out}", *RANDOM_RUN, "schedule.steps=8"])
    config_keys = {k for k in run.data.params if k.startswith("config.")}
    assert config_keys == {f"config.{k}" for k in flatten_params(cfg.to_dict())}
    assert all(k.split(".")[0] in ("config", "ds_config", "preset", "layout", "git_commit") for k in run.data.params)
    assert run.data.params["layout.dp"] == "2"
    for key in ("run/total_time_s", "run/mean_samples_per_s"):
        assert run.data.metrics[key] > 0
    assert json.loads((out / "checkpoints" / RECORD_NAME).read_text())["run_id"] == run.info.run_id

    _two_nodes(out, "schedule.steps=10", "--resume", "auto")
    client, (resumed,) = _runs(out)  # still one run
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 11))
    assert resumed.data.params["config.schedule.steps"] == "8"  # a param keeps its first value
    assert resumed.data.tags["param_changed.config.schedule.steps"] == "8 -> 10"


@pytest.mark.timeout(900)
def test_a_run_killed_with_sigkill_is_continued_and_finished_on_resume(tmp_path, store_template):
    out = tmp_path / "run"
    seed_store(store_template, out / "mlflow.db")
    # killed as soon as its first checkpoint (step 2) is complete, 10 steps before its end
    args = [sys.executable, LAUNCHER, "--ds_config", DS, f"output_dir={out}", *RANDOM_RUN, "schedule.steps=12"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # the checkpoint's steps must be in the store too: the tracker delivers from a background
        # thread, and a step still in its outbox is lost with the process (the resume starts after it)
        while not ((out / "checkpoints" / RECORD_NAME).exists() and (out / "checkpoints" / "latest").exists()
                   and {1, 2} <= _loss_steps(out)):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint and run record in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    client, (killed,) = _runs(out)
    assert killed.info.status == "RUNNING"  # a killed process cannot close its run

    result = _run(args + ["--resume", "auto"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client, (run,) = _runs(out)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, 13))
