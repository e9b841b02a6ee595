"""Param flattening within MLflow's limits, the run-setup record, and the outbox's bounds."""
import re
from pathlib import Path

from tests.tracking.test_embedded_store import is_checkout_commit
from vlmo_large.config import get_preset
from vlmo_large.tracking import Tracker, create_tracker, flatten_params, git_commit, run_setup
from vlmo_large.tracking.outbox import METRICS_PER_REQUEST, Op, Outbox
from vlmo_large.tracking.params import MAX_KEY_LENGTH, MAX_VALUE_LENGTH, TRUNCATION_MARK


def test_flatten_nested_config_to_string_params():
    flat = flatten_params({"model": get_preset("tiny"), "ds": {"zero_optimization": {"stage": 2}, "fp16": {}},
                           "betas": (0.9, 0.98), "path": Path("/x"), "none": None})
    assert flat["model.embed_dim"] == "64" and flat["model.layer_scale_init"] == "0.1"
    assert flat["ds.zero_optimization.stage"] == "2"
    assert flat["ds.fp16"] == "{}" and flat["betas"] == "[0.9, 0.98]" and flat["path"] == "/x"
    assert flat["none"] == "null"
    assert all(isinstance(v, str) for v in flat.values())


def test_long_keys_and_values_fit_mlflow_limits():
    flat = flatten_params({"k" * 300: "v", "long": "x" * 10_000})
    (long_key,) = [k for k in flat if k.startswith("~")]
    assert len(long_key) == MAX_KEY_LENGTH
    assert len(flat["long"]) == MAX_VALUE_LENGTH and flat["long"].endswith(TRUNCATION_MARK)


def test_run_setup_records_layout_preset_and_commit():
    setup = run_setup(config=get_preset("tiny"), ds_config={"train_batch_size": 8}, preset="tiny",
                      layout={"tp": 2, "pp": 1, "dp": 4, "zero": 1})
    assert re.fullmatch(r"[0-9a-f]{40}", setup["git_commit"]) and is_checkout_commit(setup["git_commit"])
    assert setup["layout"] == {"tp": 2, "pp": 1, "dp": 4, "zero": 1} and setup["preset"] == "tiny"
    assert git_commit("/") is None  # outside a checkout
    assert "ds_config" not in run_setup(config={"a": 1}, commit="abc")


def test_other_ranks_get_a_silent_no_op(tmp_path):
    tracker = create_tracker(tmp_path / "out", rank=3)
    assert type(tracker) is Tracker and not tracker.enabled
    tracker.log_run_setup(config={"a": 1})
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.log_artifact(tmp_path / "missing")
    tracker.log_figure(None, "f")
    tracker.finish()
    assert not (tmp_path / "out").exists()


def metrics_op(first: int, count: int) -> Op:
    return Op("metrics", [(f"m{i}", float(i), 0, i) for i in range(first, first + count)])


def test_outbox_drops_oldest_metrics_beyond_its_bound_and_keeps_other_records():
    box = Outbox(max_metrics=10)
    box.put(Op("params", [("a", "1")]))
    box.put(metrics_op(0, 6))
    box.put(metrics_op(6, 6))
    box.put(Op("finish", "FINISHED"))
    assert box.dropped_metrics == 2 and box.pending_metrics == 10
    assert box.take(0).kind == "params"
    merged = box.take(0)
    assert [r[3] for r in merged.payload] == list(range(2, 12))  # oldest two gone, order kept
    box.requeue([merged])                                          # undelivered: back at the front
    box.put(metrics_op(12, 3))                                     # pushes out 3 more of the oldest
    assert box.dropped_metrics == 5
    assert [r[3] for r in box.take(0).payload] == list(range(5, 12))
    assert box.take(0).kind == "finish"  # never merged across: order of records is kept
    assert [r[3] for r in box.take(0).payload] == [12, 13, 14]
    box.settle()
    assert box.take(0) is None and box.idle


def test_outbox_merges_metric_ops_up_to_one_request():
    box = Outbox()
    for n in range(3):
        box.put(metrics_op(n * 400, 400))
    assert len(box.take(0).payload) == 800 <= METRICS_PER_REQUEST
    assert not box.idle  # one op taken, not settled
    assert len(box.take(0).payload) == 400
    box.settle()
    assert box.idle
