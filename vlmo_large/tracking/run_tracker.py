"""The tracker of one training launch (launchers/pretrain.py): which MLflow run, and who logs what.

- rank 0: the MLflow tracker. A resumed launch (`resume` set) continues the run recorded in the
  checkpoint folder (run_record.py) when it was logged to the same store; otherwise a new run
  starts, and a recorded run left RUNNING by a killed process is marked KILLED. The run is named
  <preset>-<stage>-<output folder name>; every config key is logged once (as config.<key>, with
  the DeepSpeed config, preset, layout and commit; see Tracker.log_run_setup);
- local rank 0 of every other node: that node's system metrics only (node_metrics.py);
- every other rank: nothing.
The launcher closes it with `finish("FINISHED" | "FAILED" | "KILLED")`.
"""
from __future__ import annotations

import dataclasses
import os

from vlmo_large.tracking.node_metrics import NodeSystemMetrics
from vlmo_large.tracking.run_record import node_id, read_record
from vlmo_large.tracking.factory import create_tracker
from vlmo_large.tracking.tracker import Tracker


def run_name(cfg) -> str:
    return f"{cfg.preset}-{cfg.stage}-{os.path.basename(os.path.normpath(cfg.output_dir))}"


def checkpoint_dir(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.output_dir, "checkpoints")


def tracker_for_run(cfg, resolved, config_files=()) -> Tracker:
    """`cfg`: the RunConfig; `resolved`: its ResolvedRun; `config_files`: logged as artifacts."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if (cfg.tracking_uri or "").lower() == "none":
        return Tracker()
    if rank != 0:
        return NodeSystemMetrics(checkpoint_dir(cfg), node_id()) if local_rank == 0 else Tracker()

    from vlmo_large.tracking.mlflow_tracker import EXPERIMENT, store_uri
    previous = read_record(checkpoint_dir(cfg))
    same_store = bool(previous) and previous.get("tracking_uri") == store_uri(cfg.output_dir, cfg.tracking_uri) \
        and previous.get("experiment") == EXPERIMENT
    continued = previous["run_id"] if same_store and cfg.resume else None
    tracker = create_tracker(cfg.output_dir, cfg.tracking_uri, EXPERIMENT, run_name(cfg), rank=0,
                             run_id=continued, record_dir=checkpoint_dir(cfg), node_id=node_id(),
                             supersede=previous["run_id"] if same_store and not continued else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": world // (cfg.parallel.tp * cfg.parallel.pp),
              "zero": resolved.ds_config.get("zero_optimization", {}).get("stage", 0)}
    tracker.log_run_setup(config=cfg.to_dict(), ds_config=resolved.ds_config,
                          preset=dataclasses.asdict(resolved.model), layout=layout)
    for path in config_files:
        if path:
            tracker.log_artifact(path)
    return tracker
