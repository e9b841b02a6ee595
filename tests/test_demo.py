"""The README's demo runs end to end (a few steps here; the full run's learning is in the README)."""
import json
import os
import subprocess
import sys

import mlflow

from tests.conftest import seed_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end_and_reports_retrieval(tmp_path, store_template):
    env = dict(os.environ, OMP_NUM_THREADS="2", MLFLOW_DISABLE_TELEMETRY="true")
    seed_store(store_template, tmp_path / "vl" / "mlflow.db")  # a migrated empty store: no migrations in the run
    # 2 steps: held-out evaluation runs every step (eval_every = steps // 4, at least 1)
    result = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "demo.py"), "--out", str(tmp_path),
                             "--steps", "2", "--batch", "8"], capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out retrieval (100 images, zero-shot): image->text R@1" in result.stdout
    metrics = json.loads((tmp_path / "retrieval.json").read_text())
    assert 0.0 <= metrics["tr_r1"] <= 1.0 and metrics["chance_r1"] == 0.01
    assert (tmp_path / "vl" / "export" / "model.safetensors").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'vl' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and "eval/tr_r1" in run.data.metrics
