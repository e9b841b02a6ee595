"""TP=2 in real processes (torchrun, gloo) equals one process: every output and every gradient."""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.parallel.tp_probe import probe_batch, probe_outputs
from tests.training.conftest import REPO, run_torchrun
from vlmo_large.model import build_model


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_weights):
    tmp, weights = tmp_path_factory.mktemp("tp"), tiny_weights
    model = build_model("tiny").train()
    model.load_state_dict(load_file(str(weights)))
    outputs = probe_outputs(model, probe_batch(model.cfg))
    outputs["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return tmp, weights, outputs, grads


def test_tp2_equals_single_process(reference):
    tmp, weights, outputs, grads = reference
    out = tmp / "tp2.pt"
    run_torchrun([os.path.join(REPO, "tests/parallel/tp_probe.py"), str(weights), str(out)], nproc=2)
    got = torch.load(out, weights_only=True)
    for name, ref in outputs.items():
        torch.testing.assert_close(got["outputs"][name], ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert set(got["grads"]) == set(grads)
    for name, ref in grads.items():
        scale = ref.abs().max().item() + 1e-12
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-5, atol=1e-5 * scale, msg=name)
