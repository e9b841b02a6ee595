"""TP=2 in real processes (torchrun, gloo) equals one process: every output and every gradient."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import randomize_
from tests.parallel.tp_probe import probe_batch, probe_outputs
from vlmo_large.model import build_model

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def run_torchrun(script: str, args: list[str], nproc: int, timeout: int = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    model = randomize_(build_model("tiny").train(), seed=5)
    weights = tmp / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    outputs = probe_outputs(model, probe_batch(model.cfg))
    outputs["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return tmp, weights, outputs, grads


def test_tp2_equals_single_process(reference):
    tmp, weights, outputs, grads = reference
    out = tmp / "tp2.pt"
    run_torchrun(os.path.join(REPO, "tests/parallel/tp_probe.py"), [str(weights), str(out)], nproc=2)
    got = torch.load(out, weights_only=True)
    for name, ref in outputs.items():
        torch.testing.assert_close(got["outputs"][name], ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert set(got["grads"]) == set(grads)
    for name, ref in grads.items():
        scale = ref.abs().max().item() + 1e-12
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-5, atol=1e-5 * scale, msg=name)
