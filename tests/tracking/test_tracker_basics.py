"""tracking_uri="none": a run without MLflow (no store written, nothing imported from mlflow)."""


def test_tracking_uri_none_turns_tracking_off(tmp_path):
    from vlmo_large.tracking import create_tracker
    tracker = create_tracker(tmp_path, "none")
    assert not tracker.enabled
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.finish()
    assert not (tmp_path / "mlflow.db").exists()
