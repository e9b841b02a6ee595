"""MLflow tracking that can neither stop nor slow training.

Every `log_*` call only appends to a bounded in-memory outbox (outbox.py); one background thread
owns the MlflowClient and delivers in order. So:
- a slow or dead tracking server never blocks the loop (no network call happens on its thread);
- when delivery fails for a transient reason (server unreachable, 5xx, sqlite busy), a warning is
  logged ONCE per outage, operations stay queued and are retried with backoff (1 s doubling to
  `retry_interval[1]`); metric points beyond `max_buffered_metrics` are dropped, oldest first, and
  counted (`health()["dropped_metrics"]`, and the line logged on recovery);
- a request the store rejects (4xx: bad key, missing file) is logged and dropped rather than
  retried forever;
- `finish()` drains: it retries at least every `DRAIN_RETRY_S` (whatever the backoff had grown to)
  until `timeout` seconds have passed, then gives up and says exactly what was not delivered;
- a run continued on resume (`run_id=`) is set RUNNING again; params it already holds are not sent
  again, a param whose value changed is kept as the tag `param_changed.<key>` ("old -> new");
- with `record_dir`, the run id is written there when the run is ready (run_record.py); with
  `node_id`, MLflow's own system metrics (CPU, memory, disk, network, GPU when pynvml finds one) of
  this node are logged to the run as system/<node_id>/...
The run itself is created by the background thread, so `run_id` is None until the store answers.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vlmo_large.tracking.outbox import METRICS_PER_REQUEST, Op, Outbox
from vlmo_large.tracking.params import MAX_KEY_LENGTH, flatten_params
from vlmo_large.tracking.tracker import Tracker

log = logging.getLogger("vlmo_large.tracking")
PARAMS_PER_REQUEST = 100  # mlflow's MAX_PARAMS_TAGS_PER_BATCH
MAX_TAG_LENGTH = 8000
_THREAD_PREFIX = "vlmo-mlflow-sender"
DRAIN_RETRY_S = 0.5  # the longest wait between attempts once finish() is draining
STOP_WAIT_S = 5.0    # after giving up: how long a request still in flight may take to end
EXPERIMENT = "vlmo_large"


class MlflowTracker(Tracker):
    enabled = True

    def __init__(self, output_dir: str | os.PathLike, tracking_uri: str | None = None,
                 experiment: str = EXPERIMENT, run_name: str | None = None, *, run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None, max_buffered_metrics: int = 100_000,
                 retry_interval: tuple[float, float] = (1.0, 30.0), record_dir: str | os.PathLike | None = None,
                 node_id: str | None = None, supersede: str | None = None):
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        local = tracking_uri is None
        self.tracking_uri = store_uri(output_dir, tracking_uri)
        # Without this the embedded store puts artifacts in ./mlruns of whatever the cwd is.
        self._artifact_location = (self.output_dir / "mlruns").as_uri() if local else None
        if self.tracking_uri.startswith(("http://", "https://")):
            _bound_http_waits()
        self.experiment, self.run_name = experiment, run_name
        self.run_id: str | None = None
        self._resume_id, self._tags = run_id, {k: str(v) for k, v in (tags or {}).items()}
        self._record_dir, self._node_id, self._supersede = record_dir, node_id, supersede
        self._stored_params: dict[str, str] = {}  # what the store holds (a continued run's, then ours)
        self._monitor = None
        self._drain_until: float | None = None
        self._start_ms = _now_ms()
        self._retry_min, self._retry_max = retry_interval
        self._outbox = Outbox(max_buffered_metrics)
        self._params_logged: dict[str, str] = {}
        self._warned: set[str] = set()
        self._closed = False
        self._outage_since: float | None = None
        self._health = {"connected": None, "outages": 0, "last_error": None, "rejected_metrics": 0}
        self._retry_now, self._stop, self._terminated = threading.Event(), threading.Event(), threading.Event()
        _quiet_urllib3_retries()
        self._thread = threading.Thread(target=self._deliver_loop, name=f"{_THREAD_PREFIX}-{id(self):x}",
                                        daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # -- the training loop's side: append and return ---------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._guard(self._put_params, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Values: Python numbers or 0-d tensors (a CUDA tensor costs a device sync here)."""
        self._guard(self._put_metrics, metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._guard(self._put_chunked, "tags", [(str(k), str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._guard(self._put_artifact, path, artifact_path)

    def log_figure(self, fig, name: str) -> None:
        """Saved now, under <output_dir>/figures/ (the upload is later: put the step in `name` to
        keep every version, a reused name is overwritten)."""
        self._guard(self._put_figure, fig, name)

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._drain_until = time.monotonic() + timeout
        self._outbox.put(Op("finish", status))
        self._retry_now.set()  # skip the current backoff wait: try now
        delivered = self._terminated.wait(timeout)
        self._stop.set()
        self._retry_now.set()
        self._outbox.wake()
        if not delivered:
            self._thread.join(STOP_WAIT_S)  # a request in flight may still be answered
            if not self._terminated.is_set():
                log.warning(self._undelivered_report(status, timeout))

    def _undelivered_report(self, status: str, timeout: float) -> str:
        queued, in_flight = self._outbox.undelivered()
        text = (f"MLflow tracking: gave up after {timeout:.0f} s (last error: {self._health['last_error']}); "
                f"not delivered: {_counts(queued) or 'no records'}; run {self.run_id or '(never created)'} "
                f"not marked {status}")
        if in_flight:
            text += f"; in a request left unanswered (may have arrived): {_counts(in_flight)}"
        return text

    def flush(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self._outbox.idle:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            self._retry_now.set()
            time.sleep(0.02)
        return True

    def health(self) -> dict[str, Any]:
        return dict(self._health, dropped_metrics=self._outbox.dropped_metrics,
                    pending_metrics=self._outbox.pending_metrics, run_id=self.run_id)

    # -- building operations (caller's thread) ---------------------------------------------------
    def _guard(self, fn, *args) -> None:
        if self._closed:
            return
        try:
            fn(*args)
        except Exception as err:  # never into the training loop
            self._warn_once(f"{fn.__name__}: {type(err).__name__}", f"MLflow tracking: {fn.__name__} failed: {err!r}")

    def _put_params(self, params: Mapping[str, Any]) -> None:
        fresh = []
        for key, value in flatten_params(params).items():
            old = self._params_logged.get(key)
            if old is None:
                fresh.append((key, value))
                self._params_logged[key] = value
            elif old != value:  # MLflow params are immutable
                self._warn_once(f"param {key}", f"MLflow tracking: param {key!r} already logged as {old!r}; "
                                f"new value {value!r} not recorded")
        self._put_chunked("params", fresh)

    def _put_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        stamp, records = _now_ms(), []
        for key, value in metrics.items():
            try:
                records.append((_metric_key(key), float(value), stamp, int(step)))
            except (TypeError, ValueError):
                self._warn_once(f"metric {key}", f"MLflow tracking: metric {key!r} is not a number "
                                f"({type(value).__name__}); skipped")
        for i in range(0, len(records), METRICS_PER_REQUEST):
            self._outbox.put(Op("metrics", records[i:i + METRICS_PER_REQUEST]))

    def _put_chunked(self, kind: str, items: list) -> None:
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self._outbox.put(Op(kind, items[i:i + PARAMS_PER_REQUEST]))

    def _put_artifact(self, path, artifact_path) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        self._outbox.put(Op("artifact", (str(path.resolve()), artifact_path)))

    def _put_figure(self, fig, name: str) -> None:
        path = self.output_dir / "figures" / (name if Path(name).suffix else f"{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")  # matplotlib is not thread-safe: save here
        self._put_artifact(path, "figures")

    # -- delivery (background thread) ------------------------------------------------------------
    def _deliver_loop(self) -> None:
        client, backoff = None, self._retry_min
        while not self._stop.is_set():
            op = self._outbox.take(timeout=0.5)
            if op is None:
                continue
            try:
                client = client or MlflowClient(self.tracking_uri)
                self._ensure_run(client)
                self._send(client, op)
            except Exception as err:
                if _is_rejection(err):
                    self._reject(op, err)
                    continue
                self._outbox.requeue([op])
                self._mark_outage(err)
                wait = backoff
                if self._drain_until is not None:  # finishing: retry promptly until the deadline
                    wait = min(wait, DRAIN_RETRY_S, max(0.0, self._drain_until - time.monotonic()))
                self._retry_now.wait(wait)
                self._retry_now.clear()
                backoff = min(2 * backoff, self._retry_max)
                continue
            self._mark_connected()  # before settle: whoever sees the outbox idle (flush) sees the reconnect too
            self._outbox.settle()
            backoff = self._retry_min
            if op.kind == "finish":
                self._terminated.set()
                return

    def _ensure_run(self, client: MlflowClient) -> None:
        if self.run_id is not None:
            return
        run_id = self._continue_run(client) if self._resume_id else None
        if run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                experiment_id = client.create_experiment(self.experiment, artifact_location=self._artifact_location)
            else:
                experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, start_time=self._start_ms, tags=self._tags, run_name=self.run_name)
            run_id = run.info.run_id
        self.run_id = run_id
        self._run_ready(client)

    def _continue_run(self, client: MlflowClient) -> str | None:
        """Set the run RUNNING again and note the params it holds; None (a new run) if it is gone."""
        try:
            run = client.get_run(self._resume_id)
        except MlflowException as err:
            if not _is_rejection(err):
                raise  # no answer from the store: retried as an outage
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow tracking: run %s (to continue) is not in %s; logging to a new run",
                        self._resume_id, self.tracking_uri)
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        self._stored_params = dict(run.data.params)
        return run.info.run_id

    def _run_ready(self, client: MlflowClient) -> None:
        """Once per tracker: record the run id, close the run it replaces, start system metrics.
        None of these may stop the logging itself."""
        from vlmo_large.tracking.run_record import write_record
        try:
            if self._record_dir is not None:
                write_record(self._record_dir, self.run_id, self.tracking_uri, self.experiment)
            if self._supersede and self._supersede != self.run_id:
                old = client.get_run(self._supersede)
                if old.info.status == "RUNNING":  # its process died without closing it (kill -9)
                    client.set_tag(old.info.run_id, "superseded_by", self.run_id)
                    client.set_terminated(old.info.run_id, status="KILLED")
        except Exception as err:
            self._warn_once("run ready", f"MLflow tracking: after starting run {self.run_id}: {_short(err)}")
        if self._node_id is not None:
            from vlmo_large.tracking.node_metrics import start_system_metrics
            self._monitor = start_system_metrics(self.run_id, self.tracking_uri, self._node_id)

    def _send(self, client: MlflowClient, op: Op) -> None:
        if op.kind == "metrics":
            client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in op.payload], synchronous=True)
        elif op.kind == "params":
            self._send_params(client, op.payload)
        elif op.kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op.payload], synchronous=True)
        elif op.kind == "artifact":
            local, artifact_path = op.payload
            if os.path.isdir(local):
                client.log_artifacts(self.run_id, local, artifact_path)
            else:
                client.log_artifact(self.run_id, local, artifact_path)
        elif op.kind == "finish":
            if self._monitor is not None:  # its last samples go before the run is closed
                monitor, self._monitor = self._monitor, None
                monitor.finish()
            client.set_terminated(self.run_id, status=op.payload)

    def _send_params(self, client: MlflowClient, items: list[tuple[str, str]]) -> None:
        # MLflow refuses to change a param: a continued run keeps its first value, the new one is a tag.
        fresh = [(k, v) for k, v in items if k not in self._stored_params]
        changed = [(f"param_changed.{k}"[:MAX_KEY_LENGTH], f"{self._stored_params[k]} -> {v}"[:MAX_TAG_LENGTH])
                   for k, v in items if k in self._stored_params and self._stored_params[k] != v]
        if fresh:
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in fresh], synchronous=True)
            self._stored_params.update(fresh)
        if changed:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in changed], synchronous=True)
            self._warn_once("param changed", f"MLflow tracking: run {self.run_id} continues with {len(changed)} "
                            f"changed param(s) (first: {changed[0][0][14:]}); kept as param_changed.* tags")

    def _reject(self, op: Op, err: Exception) -> None:
        if op.kind == "params" and len(op.payload) > 1:
            # One conflicting param (e.g. a resumed run) must not cost the other 99: retry singly.
            self._outbox.requeue([Op("params", [item]) for item in op.payload])
            return
        self._outbox.settle()
        self._health["rejected_metrics"] += op.size
        self._warn_once(f"rejected {op.kind}", f"MLflow tracking: the store rejected {op.kind} "
                        f"({_short(err)}); dropped (said once per kind)")
        if op.kind == "finish":
            self._terminated.set()

    def _mark_outage(self, err: Exception) -> None:
        self._health.update(connected=False, last_error=_short(err))
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._health["outages"] += 1
            log.warning("MLflow tracking at %s unreachable (%s); training continues, logging is buffered "
                        "(up to %d metric points, oldest dropped beyond) and retried in the background",
                        self.tracking_uri, _short(err), self._outbox.max_metrics)

    def _mark_connected(self) -> None:
        self._health["connected"] = True
        if self._outage_since is not None:
            log.warning("MLflow tracking at %s reachable again after %.0f s; %d metric points dropped so far",
                        self.tracking_uri, time.monotonic() - self._outage_since, self._outbox.dropped_metrics)
            self._outage_since = None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _at_exit(self) -> None:
        # The process is ending without finish(): deliver briefly and record that.
        if not self._closed:
            self.finish("KILLED", timeout=5.0)


def store_uri(output_dir: str | os.PathLike, tracking_uri: str | None) -> str:
    """The tracking URI a run logs to: `tracking_uri`, or the embedded store in `output_dir`."""
    return tracking_uri or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def _is_rejection(err: Exception) -> bool:
    """A request the store answered with "no" (retrying cannot help) vs. a failure to get an answer."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return 400 <= status < 500 and status != 429
    return isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, TypeError))


def _bound_http_waits() -> None:
    # mlflow's defaults (7 retries with exponential backoff, 120 s timeout) hold one request for
    # minutes; the sender retries on its own schedule, so each request may fail fast. Explicit
    # settings in the environment win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class _DropSenderRetries(logging.Filter):
    """urllib3 logs every retry; during an outage the sender's own single warning is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(_THREAD_PREFIX)


def _quiet_urllib3_retries() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _DropSenderRetries) for f in logger.filters):
        logger.addFilter(_DropSenderRetries())


def _metric_key(key: str) -> str:
    return re.sub(r"[^/\w.\- :]", "_", str(key))[:250]  # mlflow's allowed name characters


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items())


def _short(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) < 300 else text[:300] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)
