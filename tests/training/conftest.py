import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


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
    """One torchrun (2 ranks, ZeRO-3) running every multi-process check of dist_worker.py."""
    out = tmp_path_factory.mktemp("multi_rank")
    run_torchrun([os.path.join(REPO, "tests", "training", "dist_worker.py"), str(out)])
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A small synthetic dataset (image-text, held-out and retrieval splits) shared by launcher tests."""
    from vlmo_large.data.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), num_pairs=64, num_images=8, num_texts=8,
                          num_val=16, num_retrieval=6, num_vqa_images=2, num_nlvr2=2, samples_per_shard=16)
