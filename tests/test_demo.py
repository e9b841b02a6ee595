"""The README's demo runs end to end (a few steps here; the full run's learning is in the README)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end_and_reports_retrieval(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run([sys.executable, os.path.join(REPO, "launchers", "demo.py"), "--out", str(tmp_path),
                             "--steps", "4", "--batch", "8"], capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out retrieval (100 images, zero-shot): image->text R@1" in result.stdout
    metrics = json.loads((tmp_path / "retrieval.json").read_text())
    assert 0.0 <= metrics["tr_r1"] <= 1.0 and metrics["chance_r1"] == 0.01
    assert (tmp_path / "vl" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "vl" / "mlflow.db").is_file()
