"""`create_tracker`: the MLflow tracker on rank 0, the no-op `Tracker` elsewhere.

Apart from tracker.py so that the interface does not import its MLflow implementation, which
subclasses it (tracker <-> mlflow_tracker was an import cycle).
"""
from __future__ import annotations

import os

from vlmo_large.tracking.tracker import Tracker


def create_tracker(output_dir: str | os.PathLike, tracking_uri: str | None = None,
                   experiment: str = "vlmo_large", run_name: str | None = None, rank: int = 0,
                   **options) -> Tracker:
    """Rank 0: an MLflow tracker; other ranks: a no-op `Tracker`.

    Default store: MLflow's embedded store in `output_dir` (sqlite:///<output_dir>/mlflow.db,
    artifacts under <output_dir>/mlruns); view it with
    `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlflow.db`. `tracking_uri` (http://host:port)
    logs to a tracking server instead. `options` go to `MlflowTracker` (run_id to continue a run,
    tags, max_buffered_metrics, retry_interval, record_dir to write the run id to, node_id for this
    node's system metrics, supersede: a run to mark KILLED if still RUNNING). `tracking_uri="none"`
    turns tracking off. A training launch uses `run_tracker.tracker_for_run`, which sets these.
    """
    if rank != 0 or (tracking_uri or "").lower() == "none":
        return Tracker()
    from vlmo_large.tracking.mlflow_tracker import MlflowTracker  # mlflow is imported on rank 0 only
    return MlflowTracker(output_dir, tracking_uri, experiment, run_name, **options)
