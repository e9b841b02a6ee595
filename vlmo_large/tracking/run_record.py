"""Which MLflow run a training run logs to, kept with its checkpoints: `<checkpoint dir>/mlflow_run.json`.

Rank 0 writes it each time its run is ready (created, or continued on resume). It serves two readers:
- a resumed launch (`--resume`) continues the recorded run instead of opening a new one, when the
  tracking store and experiment are unchanged;
- every other node's local rank 0 learns the run id from it to log that node's system metrics; the
  `launch` token tells it the record is this launch's, not one left by an earlier launch.
A run ended by kill -9 cannot mark itself: it stays RUNNING until it is resumed (then continued
and closed) or a fresh run replaces the record (then it is marked KILLED).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("vlmo_large.tracking")
RECORD_NAME = "mlflow_run.json"
# Set identically on every node of one launch by torchrun, Slurm or the deepspeed launcher.
_LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "MASTER_ADDR", "MASTER_PORT")


def launch_token() -> str:
    return "|".join(os.environ.get(name, "") for name in _LAUNCH_VARS)


def node_index() -> int:
    """This process's node: torchrun's GROUP_RANK, the deepspeed launcher's CROSS_RANK, else RANK // local size."""
    for name in ("GROUP_RANK", "CROSS_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return int(os.environ.get("RANK", "0")) // max(1, int(local))


def node_id(index: int | None = None) -> str:
    """The node's name in system metric keys: system/<node_id>/cpu_utilization_percentage."""
    return f"node_{node_index() if index is None else index}"


def write_record(directory: str | os.PathLike, run_id: str, tracking_uri: str, experiment: str) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment": experiment,
              "launch": launch_token(), "written_at": time.time()}
    tmp = directory / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, directory / RECORD_NAME)  # readers on other nodes never see half a file


def read_record(directory: str | os.PathLike, quiet: bool = False) -> dict | None:
    """The record, or None when there is none or it cannot be read (then a new run starts)."""
    path = Path(directory) / RECORD_NAME
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise ValueError("no run id in it")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        if not quiet:
            log.warning("MLflow tracking: cannot read %s (%s); it is ignored", path, err)
        return None
    return record


def record_of_this_launch(directory: str | os.PathLike, started_at: float, slack_s: float = 120.0) -> dict | None:
    """The record rank 0 wrote in this launch: same launch token, written after this process started
    (less `slack_s` for clocks that differ between nodes); None until then."""
    record = read_record(directory, quiet=True)
    if record and record.get("launch") == launch_token() and record.get("written_at", 0) >= started_at - slack_s:
        return record
    return None
