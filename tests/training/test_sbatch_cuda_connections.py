"""launchers/slurm_pretrain.sbatch sets CUDA_DEVICE_MAX_CONNECTIONS=1 for the ranks only when the run
uses tensor parallelism (from the run config or an override): elsewhere it would serialise ZeRO's
communication behind compute. Slurm and DeepSpeed are stand-ins (tests/training/test_ops_sbatch.py)."""
import os
import stat
import subprocess
import sys

import pytest

from tests.training.conftest import REPO
from tests.training.test_ops_sbatch import SCRIPT, STUBS


def ranks_env(tmp_path, run_yaml: str, *overrides) -> dict:
    """Run the script to the end (the ranks 'exit' at once); the ranks' environment file as a dict."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (log / "ranks_stopped").touch()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "run.yaml").write_text(run_yaml)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_GPUS_ON_NODE="8", PYTHONPATH=REPO,
               PYTHON=sys.executable)
    result = subprocess.run(["bash", SCRIPT, "ds.json", "run.yaml", *overrides], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize("run_yaml, overrides, expected", [
    ("preset: large\n", ["preset=large"], None),
    ("preset: giant\nparallel:\n  tp: 4\n  pp: 2\n", [], "1"),
    ("preset: giant\n", ["parallel.tp=2", "--resume", "auto"], "1"),
    ("preset: giant\nparallel:\n  tp: 4\n", ["parallel.tp=1"], None),
])
def test_one_cuda_queue_only_under_tensor_parallelism(tmp_path, run_yaml, overrides, expected):
    assert ranks_env(tmp_path, run_yaml, *overrides).get("CUDA_DEVICE_MAX_CONNECTIONS") == expected
