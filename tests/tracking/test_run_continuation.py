"""One MLflow run across launches (embedded store): the run id kept with the checkpoints, a continued
run's params, a run left RUNNING by a killed process, system metrics of two nodes in one run, and
the exact account of what a tracker that gives up did not deliver."""
import json
import logging
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.tracking.conftest import free_port, seed_store
from vlmo_large.tracking import create_tracker
from vlmo_large.tracking.node_metrics import NodeSystemMetrics
from vlmo_large.tracking.run_record import RECORD_NAME, launch_token, read_record, write_record


def runs_of(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_continued_run_logs_new_params_and_keeps_changed_ones_as_tags(tmp_path, caplog, store_template):
    out, ckpt = tmp_path / "out", tmp_path / "out" / "checkpoints"
    seed_store(store_template, out / "mlflow.db")
    first = create_tracker(out, run_name="r", record_dir=ckpt)
    first.log_params({"steps": 4, "lr": 0.1})
    first.finish("KILLED")
    record = json.loads((ckpt / RECORD_NAME).read_text())
    assert record["run_id"] == first.run_id and record["tracking_uri"] == f"sqlite:///{out.resolve()}/mlflow.db"
    assert record["launch"] == launch_token()

    with caplog.at_level(logging.WARNING, logger="vlmo_large.tracking"):
        second = create_tracker(out, run_id=record["run_id"], record_dir=ckpt)
        second.log_params({"steps": 8, "lr": 0.1, "warmup": 2})
        second.log_metrics({"loss": 1.0}, 5)
        assert second.flush(60)
        client = MlflowClient(f"sqlite:///{out}/mlflow.db")
        assert client.get_run(first.run_id).info.status == "RUNNING"  # continued: running again
        second.finish()
    run = client.get_run(first.run_id)
    assert second.run_id == first.run_id and len(runs_of(client)) == 1
    assert run.info.status == "FINISHED"
    assert run.data.params == {"steps": "4", "lr": "0.1", "warmup": "2"}  # MLflow keeps a param's first value
    assert run.data.tags["param_changed.steps"] == "4 -> 8" and "param_changed.lr" not in run.data.tags
    assert not [r for r in caplog.records if "rejected" in r.getMessage()]
    assert read_record(ckpt)["run_id"] == first.run_id


def test_a_run_missing_from_the_store_is_replaced_by_a_new_one(tmp_path, caplog, store_template):
    seed_store(store_template, tmp_path / "mlflow.db")
    with caplog.at_level(logging.WARNING, logger="vlmo_large.tracking"):
        tracker = create_tracker(tmp_path, run_id="0" * 32)
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.finish()
    assert tracker.run_id not in (None, "0" * 32)
    assert any("logging to a new run" in r.getMessage() for r in caplog.records)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.0}


def test_a_fresh_run_marks_the_recorded_run_left_running_killed(tmp_path, store_template):
    seed_store(store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    stale = client.create_run(client.create_experiment("vlmo_large", (tmp_path / "mlruns").as_uri())).info.run_id
    write_record(tmp_path / "ckpt", stale, uri, "vlmo_large")  # as a process killed with -9 left it
    fresh = create_tracker(tmp_path, record_dir=tmp_path / "ckpt", supersede=stale)
    fresh.finish()
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(stale).data.tags["superseded_by"] == fresh.run_id
    assert read_record(tmp_path / "ckpt")["run_id"] == fresh.run_id != stale


@pytest.mark.timeout(120)
def test_system_metrics_of_two_nodes_go_to_one_run(tmp_path, monkeypatch, store_template):
    seed_store(store_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    ckpt = tmp_path / "ckpt"
    write_record(ckpt, "f" * 32, "sqlite:///elsewhere.db", "vlmo_large")  # an earlier launch's: not followed
    (ckpt / RECORD_NAME).write_text((ckpt / RECORD_NAME).read_text().replace(launch_token(), "earlier"))
    other_node = NodeSystemMetrics(ckpt, "node_1", poll_s=0.2)
    tracker = create_tracker(tmp_path, record_dir=ckpt, node_id="node_0")
    for step in range(3):
        tracker.log_metrics({"loss": 1.0}, step)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # until both nodes' first samples arrived
        keys = set(client.get_run(tracker.run_id).data.metrics) if tracker.run_id else set()
        if {"system/node_0/cpu_utilization_percentage", "system/node_1/cpu_utilization_percentage"} <= keys:
            break
        time.sleep(0.5)
    other_node.finish()
    tracker.finish()
    assert other_node.run_id == tracker.run_id
    metrics = client.get_run(tracker.run_id).data.metrics
    for node in ("node_0", "node_1"):
        assert 0 <= metrics[f"system/{node}/cpu_utilization_percentage"] <= 100
        assert metrics[f"system/{node}/system_memory_usage_megabytes"] > 0
    assert len(runs_of(client)) == 1


def test_giving_up_reports_exactly_what_was_not_delivered(tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = create_tracker(tmp_path, dead, retry_interval=(0.2, 0.2), max_buffered_metrics=5)
    (tmp_path / "a.txt").write_text("a")
    tracker.log_metrics({"loss": 1.0, "lr": 0.1}, 1)
    tracker.log_artifact(tmp_path / "a.txt")
    tracker.log_metrics({f"m{i}": 1.0 for i in range(4)}, 2)  # 6 points, room for 5: one dropped
    tracker.set_tags({"a": 1, "b": 2})
    with caplog.at_level(logging.WARNING, logger="vlmo_large.tracking"):
        tracker.finish(timeout=2.0)
    (line,) = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert "not delivered: metric points: 5, artifacts: 1, tags: 2;" in line
    assert "run (never created) not marked FINISHED" in line and "unanswered" not in line
    assert tracker.health()["dropped_metrics"] == 1
