"""System metrics (CPU, memory, disk, network; GPU when pynvml finds one) of every node, in one run.

MLflow's own `SystemMetricsMonitor` samples and logs them as system/<node_id>/<metric>. Local rank
0 of each node runs one: on rank 0's node the MLflow tracker starts it once its run exists; on
other nodes `NodeSystemMetrics` waits for rank 0 to write the run id next to the checkpoints
(run_record.py, a folder every node sees) and then starts it. Sampling every 10 s by default;
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds) changes it. MLflow's monitor stops for good once
the run is no longer RUNNING or the store cannot be reached. Several nodes should log to a
tracking server (`tracking_uri=http://...`): the embedded sqlite store is unsafe on a network file
system.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from vlmo_large.tracking.run_record import record_of_this_launch
from vlmo_large.tracking.tracker import Tracker

log = logging.getLogger("vlmo_large.tracking")


def start_system_metrics(run_id: str, tracking_uri: str, node_id: str):
    """A started monitor logging this node's metrics to `run_id`, or None (said once) if it cannot run."""
    quiet = logging.getLogger("mlflow.system_metrics")  # its start/stop/no-GPU lines on every run
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        # resume_logging: continue after the steps already in the run (a resumed run, other nodes)
        monitor = SystemMetricsMonitor(run_id, node_id=node_id, tracking_uri=tracking_uri, resume_logging=True)
    except Exception as err:  # psutil missing, store unreachable: training goes on without them
        log.warning("MLflow tracking: no system metrics for %s (%s: %s)", node_id, type(err).__name__, err)
        return None
    monitor.start()
    return monitor


class NodeSystemMetrics(Tracker):
    """The tracker of local rank 0 on a node without global rank 0: logs nothing of its own (as
    `Tracker`), only this node's system metrics, into the run named by the record in `record_dir`."""

    def __init__(self, record_dir: str | os.PathLike, node_id: str, poll_s: float = 0.5):
        self.record_dir, self.node_id, self.poll_s = record_dir, node_id, poll_s
        self._started_at = time.time()
        self._stop = threading.Event()
        self._monitor = None
        self._thread = threading.Thread(target=self._wait_then_start, name="vlmo-node-metrics", daemon=True)
        self._thread.start()

    def _wait_then_start(self) -> None:
        while not self._stop.wait(self.poll_s):
            record = record_of_this_launch(self.record_dir, self._started_at)
            if record:
                self.run_id = record["run_id"]
                self._monitor = start_system_metrics(record["run_id"], record["tracking_uri"], self.node_id)
                return

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Stop sampling and send the last samples (within `timeout` seconds)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            stopper = threading.Thread(target=monitor.finish, daemon=True)
            stopper.start()
            stopper.join(timeout)
