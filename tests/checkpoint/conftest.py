"""DeepSpeed checkpoints made once per session by real multi-process runs (torchrun, gloo)."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN = os.path.join(REPO, "tests", "checkpoint", "ds_train.py")


def torchrun(script: str, args: list, nproc: int, timeout: int = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script, *map(str, args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


class Run:
    """One training run's checkpoint folder, probe outputs (at the save) and losses."""

    def __init__(self, folder, nproc: int, **flags):
        self.ckpt, self.probe_file, self.loss_file = folder / "ckpt", folder / "probe.pt", folder / "losses.json"
        args = ["--save", self.ckpt, "--probe", self.probe_file, "--losses", self.loss_file]
        for key, value in flags.items():
            args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
        torchrun(TRAIN, args, nproc)

    @property
    def probe(self) -> dict:
        return torch.load(self.probe_file, weights_only=True)

    @property
    def losses(self) -> dict:
        with open(self.loss_file) as f:
            return {int(k): v for k, v in json.load(f).items()}


@pytest.fixture(scope="session")
def tp2_dp2_run(tmp_path_factory):
    """TP=2 x DP=2, ZeRO-1, fp32: 4 steps, saved after step 2."""
    return Run(tmp_path_factory.mktemp("tp2dp2"), 4, tp=2, zero=1, steps=4, save_at=2)


class Trained:
    """One layout of every_layout as a run: its checkpoint folder and probe outputs (at the save)."""

    def __init__(self, every_layout: dict, layout: str):
        self.ckpt, self.probe = every_layout[layout]


@pytest.fixture(scope="session")
def zero3_run(every_layout):
    """TP=1 x DP=2, ZeRO-3, fp32: one step (every_layout's tp1-z3)."""
    return Trained(every_layout, "tp1-z3")


@pytest.fixture(scope="session")
def bf16_run(every_layout):
    """TP=2 x DP=1, ZeRO-2, bf16: one step (trained in every_layout's session)."""
    return Trained(every_layout, "tp2-z2-bf16")


def assert_outputs_equal(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


LAYOUTS = ("tp1-z0", "tp2-z0", "tp1-z1", "tp2-z1", "tp1-z2", "tp2-z2", "tp1-z3", "tp2-z3", "tp1-z0-bf16")


@pytest.fixture(scope="session")
def every_layout(tmp_path_factory):
    """One torchrun session (2 ranks) training one step and saving each of LAYOUTS: TP=2 or DP=2 at
    every ZeRO stage, and bf16 at ZeRO-0; and bf16_run's TP=2 ZeRO-2 bf16 (its bf16 weights are TP
    shards, which test_every_layout's per-file bf16 check does not read) -> {layout: (checkpoint
    folder, probe outputs)}. One session instead of one launch per run: the start-ups are paid once."""
    root = tmp_path_factory.mktemp("layouts")
    (root / "probe").mkdir()
    trained = (*LAYOUTS, "tp2-z2-bf16")
    torchrun(TRAIN, ["--layouts", ",".join(trained), "--save", root, "--probe", root / "probe"], nproc=2)
    return {name: (root / name, torch.load(root / "probe" / f"{name}.pt", weights_only=True)) for name in trained}
