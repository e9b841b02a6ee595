"""`deepspeed launchers/pretrain.py ...`, the way users start it: two CPU ranks through DeepSpeed's
own launcher (it passes --local_rank) train and export, and rank 0 alone writes the metrics."""
import json
import os
import shutil
import subprocess

import pytest

from tests.training.conftest import REPO

DEEPSPEED = shutil.which("deepspeed")


@pytest.mark.skipif(DEEPSPEED is None, reason="the deepspeed launcher is not on PATH")
def test_deepspeed_launcher_two_ranks(tmp_path, dataset):
    out = tmp_path / "run"
    args = [DEEPSPEED, "--num_gpus", "2", "--master_port", "29711", os.path.join(REPO, "launchers", "pretrain.py"),
            "--ds_config", os.path.join(REPO, "ds_configs", "cpu_fp32.json"), "preset=tiny", "stage=vl",
            f"output_dir={out}", f"data.shards={dataset['image_text']['train']}",
            f"data.tokenizer={dataset['tokenizer']}", "batch.micro=4", "schedule.steps=3", "schedule.warmup=1",
            "checkpoint.every=0", "log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert (out / "export" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step00000003" / "COMPLETE").is_file()
