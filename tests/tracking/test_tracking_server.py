"""Against a real `mlflow server` on loopback: a round trip read back with MlflowClient, the embedded
store served as `mlflow ui` would serve it, a server that dies mid-run (training must neither
raise nor wait; one warning; buffered metrics arrive after the server returns), and one that comes
back while finish() drains (retried promptly, whatever the backoff had grown to)."""
import logging
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.tracking.conftest import MlflowServer, seed_store
from tests.tracking.test_embedded_store import check_run, log_a_run
from vlmo_large.tracking import create_tracker

FAST_RETRY = (0.2, 1.0)


@pytest.mark.timeout(600)
def test_server_round_trip_and_embedded_store_is_servable(tmp_path, store_template):
    # First a run in the embedded store; then a server on that same sqlite file (what
    # `mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db` runs) and a second run logged through it.
    out = tmp_path / "out"
    seed_store(store_template, out / "mlflow.db")
    local = create_tracker(out, run_name="local")
    log_a_run(local)
    local.finish()
    server = MlflowServer(tmp_path / "server", backend_uri=f"sqlite:///{out / 'mlflow.db'}").start()
    try:
        remote = create_tracker(tmp_path / "remote_out", tracking_uri=server.url, run_name="remote")
        log_a_run(remote)
        artifact = tmp_path / "notes.txt"
        artifact.write_text("hello")
        remote.log_artifact(artifact)
        remote.finish()
        client = MlflowClient(server.url)
        check_run(client, remote.run_id)
        check_run(client, local.run_id)  # the embedded run, read through the server
        assert client.download_artifacts(remote.run_id, "notes.txt", str(tmp_path / "dl")).endswith("notes.txt")
        assert (tmp_path / "dl" / "notes.txt").read_text() == "hello"
        runs = client.search_runs([client.get_experiment_by_name("vlmo_large").experiment_id])
        assert {r.info.run_name for r in runs} == {"local", "remote"}
        assert not (tmp_path / "remote_out" / "mlflow.db").exists()  # logged to the server only
    finally:
        server.stop()


def log_steps(tracker, steps) -> float:
    """Log one metric per step; return the slowest call in seconds."""
    slowest = 0.0
    for step in steps:
        start = time.perf_counter()
        tracker.log_metrics({"loss": float(step)}, step)
        slowest = max(slowest, time.perf_counter() - start)
    return slowest


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(900)
def test_server_killed_mid_run(tmp_path, caplog, mlflow_server):
    caplog.set_level(logging.WARNING)
    server = mlflow_server
    # `patient` buffers everything and waits for the server; `small` has room for 50 points and
    # gives up at finish() while the server is still down.
    patient = create_tracker(tmp_path / "a", tracking_uri=server.url, run_name="patient", retry_interval=FAST_RETRY)
    small = create_tracker(tmp_path / "b", tracking_uri=server.url, run_name="small", retry_interval=FAST_RETRY,
                           max_buffered_metrics=50)
    for tracker in (patient, small):
        log_steps(tracker, range(10))
        assert tracker.flush(120) and tracker.health()["connected"]

    server.stop()
    start = time.perf_counter()
    slowest = max(log_steps(patient, range(10, 210)), log_steps(small, range(10, 210)))
    # the loop never waits on the network (one attempt on a dead server takes ~1 s or more)
    assert slowest < 0.5 and time.perf_counter() - start < 10.0
    assert wait_for(lambda: not patient.health()["connected"] and not small.health()["connected"], 120)
    log_steps(patient, range(210, 300))  # still logging during the outage
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 2  # once per tracker, however many attempts failed
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # no per-retry noise

    # `small` gives up within its timeout, says what it lost, and keeps only its newest 50 points.
    start = time.perf_counter()
    small.finish(timeout=2.0)
    assert time.perf_counter() - start < 2.0 + 10.0  # the drain, then a request in flight at most
    assert any("gave up" in r.getMessage() for r in caplog.records)
    assert wait_for(lambda: small.health()["pending_metrics"] == 50, 30)
    assert small.health()["dropped_metrics"] == 150 and small.health()["outages"] == 1

    # The server comes back (same port, same store): `patient` delivers its backlog.
    server.start()
    assert patient.flush(300)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    patient.finish(timeout=120)
    health = patient.health()
    assert health["outages"] == 1 and health["dropped_metrics"] == 0 and health["connected"]

    client = MlflowClient(server.url)
    assert sorted(m.step for m in client.get_metric_history(patient.run_id, "loss")) == list(range(300))
    assert client.get_run(patient.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(small.run_id, "loss")) == list(range(10))
    assert client.get_run(small.run_id).info.status == "RUNNING"  # never closed: it gave up


@pytest.mark.timeout(900)
def test_server_back_during_the_drain_gets_everything(tmp_path, caplog, mlflow_server):
    # The backoff has grown past the whole drain (here 300 s at the first failure, as 30 s had
    # against a 30 s drain): finish() must still retry promptly and deliver once the server is back.
    caplog.set_level(logging.WARNING, logger="vlmo_large.tracking")
    tracker = create_tracker(tmp_path / "a", tracking_uri=mlflow_server.url, run_name="drain",
                             retry_interval=(300.0, 600.0))
    log_steps(tracker, range(10))
    assert tracker.flush(120) and tracker.health()["connected"]
    mlflow_server.stop()
    log_steps(tracker, range(10, 60))
    assert wait_for(lambda: not tracker.health()["connected"], 120)  # failed once: now in its backoff

    finisher = threading.Thread(target=tracker.finish, kwargs={"timeout": 600.0})
    finisher.start()
    time.sleep(1.0)  # draining against a dead server for a while
    assert finisher.is_alive()
    mlflow_server.start()  # up to 300 s on a busy machine, well within the drain
    back = time.monotonic()
    finisher.join(660)
    assert not finisher.is_alive() and time.monotonic() - back < 60  # retried within the drain
    client = MlflowClient(mlflow_server.url)
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == list(range(60))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert not [r for r in caplog.records if "gave up" in r.getMessage()]
