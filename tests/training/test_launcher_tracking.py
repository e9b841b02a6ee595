"""The launcher logs a run to MLflow's embedded store: params, per-step and held-out metrics, the
config files, the retrieval-examples figure and the final status; bad eval settings are config errors."""
import os
import subprocess
import sys

import mlflow

from tests.training.conftest import REPO

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
    assert run.data.params["preset"] == "tiny" or any(v == "tiny" for v in run.data.params.values())
    for key in ("loss", "itc", "itc_vl", "itm", "mlm", "lr", "samples_per_s", "eval/mlm_acc", "eval/itm_acc",
                "eval/tr_r1", "eval/ir_r5", "eval/heldout_tr_r1", "eval/loss"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cpu_fp32.json", "metrics.jsonl", "run_setup.json", "figures"} <= artifacts
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert figures == ["figures/retrieval_examples_step000002.png", "figures/retrieval_examples_step000004.png"]


def test_eval_every_without_a_split_is_a_config_error(tmp_path, dataset):
    result = _run(_args(tmp_path / "bad", dataset, "eval_every=2"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: eval_every=2 needs eval.shards or eval.retrieval_json"
