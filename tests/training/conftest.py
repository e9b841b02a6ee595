import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import seed_store

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LAUNCHER = os.path.join(REPO, "launchers", "pretrain.py")
# DeepSpeed's own launcher as users type it; the module it runs where the script is not on PATH
_SCRIPT = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
DEEPSPEED = [_SCRIPT] if os.path.isfile(_SCRIPT) else [sys.executable, "-m", "deepspeed.launcher.runner"]


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    """Real processes, gloo, one thread each, under a hard timeout (a dead peer would hang gloo)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


class StartedTorchrun:
    """run_torchrun begun now and collected later with result(), so that a test's other processes
    start up alongside it; output goes to files in `folder` (no pipe fills up and stalls it)."""

    def __init__(self, args: list[str], folder, nproc: int = 2, timeout: int = 240):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
        os.makedirs(folder, exist_ok=True)
        self.logs, self.timeout = (os.path.join(folder, "stdout.txt"), os.path.join(folder, "stderr.txt")), timeout
        with open(self.logs[0], "w") as out, open(self.logs[1], "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=REPO)

    def result(self) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=self.timeout)
        finally:
            self.proc.kill()
        with open(self.logs[0]) as out, open(self.logs[1]) as err:
            result = subprocess.CompletedProcess(self.proc.args, rc, out.read(), err.read())
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result


@pytest.fixture(scope="session")
def multi_rank_results(tmp_path_factory):
    """One torchrun (2 ranks, ZeRO-3) running every multi-process check of dist_worker.py (those of
    test_multi_rank.py and test_itm_negatives_exchange.py)."""
    out = tmp_path_factory.mktemp("multi_rank")
    run_torchrun([os.path.join(REPO, "tests", "training", "dist_worker.py"), str(out)])
    return out


@pytest.fixture(scope="session")
def deepspeed_launch(tmp_path_factory, dataset, store_template):
    """`deepspeed launchers/pretrain.py`: two CPU ranks, ZeRO-3, 3 steps on the shared shards ->
    (output dir, completed process). One run for two modules: test_deepspeed_launcher checks the
    launch, test_init_weights reads its checkpoint (two ZeRO-3 partitions) and export."""
    out = tmp_path_factory.mktemp("deepspeed_launch") / "run"
    seed_store(store_template, out / "mlflow.db")  # no store migrations in the run
    args = [*DEEPSPEED, "--num_gpus", "2", "--master_port", "29711", os.path.join(REPO, "launchers", "pretrain.py"),
            "--ds_config", os.path.join(REPO, "ds_configs", "cpu_fp32.json"), "preset=tiny", "stage=vl",
            f"output_dir={out}", f"data.shards={dataset['image_text']['train']}",
            f"data.tokenizer={dataset['tokenizer']}", "batch.micro=4", "schedule.steps=3", "schedule.warmup=1",
            "checkpoint.every=0", "log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)  # a hang guard
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def zero1_launch_args(out, dataset, *extra) -> list[str]:
    """The zero1_launch run of tests/conftest.py (2 ranks, ZeRO-1, 4 steps, checkpoints every 2)."""
    return [LAUNCHER, "--ds_config", os.path.join(REPO, "ds_configs", "cpu_fp32_zero1.json"), "preset=tiny",
            "stage=vl", f"output_dir={out}", f"data.shards={dataset['image_text']['train']}",
            f"data.tokenizer={dataset['tokenizer']}", "data.augment=light", "batch.micro=4", "schedule.steps=4",
            "schedule.warmup=1", "checkpoint.every=2", "checkpoint.keep=2", "log_every=1", *extra]
