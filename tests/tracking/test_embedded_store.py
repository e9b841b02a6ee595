"""The default store: MLflow's embedded sqlite store in the output dir, read back with MlflowClient."""
import logging
import subprocess
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from tests.tracking.conftest import seed_store
from vlmo_large.config import get_preset
from vlmo_large.tracking import create_tracker

LAYOUT = {"tp": 1, "pp": 1, "dp": 2, "zero": 2}
DS_CONFIG = {"train_batch_size": 8, "zero_optimization": {"stage": 2}, "note": "x" * 7000}


def is_checkout_commit(commit: str) -> bool:
    """This checkout's HEAD, or an ancestor of it (others may commit while the tests run)."""
    check = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=Path(__file__).parent,
                           capture_output=True)
    return len(commit) == 40 and check.returncode == 0


def log_a_run(tracker, steps: int = 20):
    tracker.log_run_setup(config=get_preset("tiny"), ds_config=DS_CONFIG, preset="tiny", layout=LAYOUT)
    for step in range(steps):
        tracker.log_metrics({"loss": 10.0 - step, "val/tr@1": step / 100}, step)
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    tracker.log_figure(fig, "curve_step0000019")
    tracker.set_tags({"stage": "3"})


def check_run(client: MlflowClient, run_id: str, steps: int = 20):
    run = client.get_run(run_id)
    params = run.data.params
    assert params["config.embed_dim"] == "64" and params["preset"] == "tiny"
    assert params["ds_config.zero_optimization.stage"] == "2" and params["ds_config.train_batch_size"] == "8"
    assert {k: params[f"layout.{k}"] for k in LAYOUT} == {k: str(v) for k, v in LAYOUT.items()}
    assert len(params["ds_config.note"]) == 6000 and params["ds_config.note"].endswith("[truncated]")
    assert is_checkout_commit(params["git_commit"]) and run.data.tags["mlflow.source.git.commit"] == params["git_commit"]
    assert run.data.tags["stage"] == "3"
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 10.0 - s) for s in range(steps)]
    assert [m.step for m in client.get_metric_history(run_id, "val/tr_1")] == list(range(steps))  # "@" is not allowed
    paths = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"run_setup.json", "figures/curve_step0000019.png"} <= paths
    assert run.info.status == "FINISHED"
    return run


def test_embedded_store_in_output_dir(tmp_path, monkeypatch, caplog):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    tracker = create_tracker(out, run_name="embedded")
    log_a_run(tracker)
    with caplog.at_level(logging.WARNING, logger="vlmo_large.tracking"):
        tracker.log_params({"preset": "large"})               # params are immutable: warned, not raised
        tracker.log_metrics({"bad": "not a number", "ok": 1.0}, 0)
        tracker.log_artifact(tmp_path / "missing.txt")
        tracker.finish()
    assert any("already logged" in r.message for r in caplog.records)
    assert any("not a number" in r.message for r in caplog.records)
    assert any("missing.txt" in r.message for r in caplog.records)

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = check_run(client, tracker.run_id)
    assert run.data.params["preset"] == "tiny" and run.data.metrics["ok"] == 1.0 and "bad" not in run.data.metrics
    assert run.info.run_name == "embedded"
    assert run.info.artifact_uri.startswith((out / "mlruns").as_uri())
    assert (out / "figures" / "curve_step0000019.png").exists()
    assert list(cwd.iterdir()) == []  # nothing in the working directory (no ./mlruns, no ./mlflow.db)
    assert tracker.health()["connected"] and tracker.health()["outages"] == 0


def test_context_manager_marks_failed_runs_and_resume_continues_a_run(tmp_path, store_template):
    out = tmp_path / "out"
    seed_store(store_template, out / "mlflow.db")  # (the test above covers creating the store)
    with pytest.raises(RuntimeError):
        with create_tracker(out) as tracker:
            tracker.log_metrics({"loss": 1.0}, 0)
            raise RuntimeError("training crashed")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(tracker.run_id).info.status == "FAILED"

    resumed = create_tracker(out, run_id=tracker.run_id)
    resumed.log_metrics({"loss": 0.5}, 1)
    resumed.finish()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 1.0), (1, 0.5)]
