"""The tracker interface the trainer calls and its no-op version (every rank but 0); factory.py picks one.

    tracker = create_tracker(out_dir, rank=global_rank)          # sqlite:///<out_dir>/mlflow.db
    tracker.log_run_setup(config=cfg, ds_config=ds, preset="large", layout={"tp": 2, "pp": 1, "dp": 4, "zero": 1})
    tracker.log_metrics({"loss": 2.3, "lr": 1e-4}, step)
    tracker.finish("FINISHED")

No method raises into the caller or waits on the network (see mlflow_tracker.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from vlmo_large.tracking.params import run_setup


class Tracker:
    """Does nothing; the tracker of ranks other than 0. `MlflowTracker` overrides every method."""

    enabled = False
    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts / dataclasses are flattened to "a.b.c" keys."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_figure(self, fig, name: str) -> None:
        """Save a matplotlib figure (PNG unless `name` has another extension) and log it."""

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Deliver what is buffered (up to `timeout` seconds), then close the run with `status`
        ("FINISHED", "FAILED" or "KILLED")."""

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to `timeout` s until everything logged so far is delivered; True if it was."""
        return True

    def health(self) -> dict[str, Any]:
        """connected, outages, dropped_metrics (buffer overflow), rejected_metrics (refused by the
        store), pending_metrics, last_error."""
        return {"connected": None, "outages": 0, "dropped_metrics": 0, "rejected_metrics": 0,
                "pending_metrics": 0, "last_error": None}

    def log_run_setup(self, config: Any = None, ds_config: Any = None, preset: Any = None,
                      layout: Any = None, commit: str | None = None) -> None:
        """Params for the resolved config, DeepSpeed config, preset, layout (tp/pp/dp/zero) and the
        git commit; the untruncated record also as the artifact run_setup.json."""
        if not self.enabled:
            return
        setup = run_setup(config, ds_config, preset, layout, commit)
        self.log_params(setup)
        if setup.get("git_commit"):
            self.set_tags({"mlflow.source.git.commit": setup["git_commit"]})  # shown by the MLflow UI
        path = Path(self.output_dir) / "run_setup.json"
        path.write_text(json.dumps(setup, indent=2, sort_keys=True))
        self.log_artifact(path)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")

