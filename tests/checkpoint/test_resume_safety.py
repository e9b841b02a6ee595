"""`--resume` through the launcher (real processes, tiny, ZeRO-0 as README's CPU config and
ZeRO-1 at DP=2): files are read weights-only (a pickled payload is refused, never run), a newest
checkpoint with a broken model file falls back to the previous one, a ZeRO-0 checkpoint resumes
on another number of ranks, and a ZeRO-1 DP=2 checkpoint at DP=1 is one line naming `to-portable`,
whose output then resumes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import REPO, dataset  # noqa: F401  (the shared synthetic shards)
from tools.convert_checkpoint import main as convert
from vlmo_large.checkpoint.safe_engine import load_weights_only

LAUNCHER = os.path.join(REPO, "launchers", "pretrain.py")


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true")


def command(out, data: dict, nproc: int, *extra, zero: int = 0, steps: int = 4) -> list[str]:
    """One rank as a plain process (torchrun would add its own traceback to a refusal), else torchrun."""
    runner = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable, *runner, LAUNCHER,
            "--ds_config", os.path.join(REPO, "ds_configs", f"cpu_fp32_zero{zero}.json"), "preset=tiny", "stage=vl",
            f"output_dir={out}", f"data.shards={data['image_text']['train']}", f"data.tokenizer={data['tokenizer']}",
            "batch.micro=4", f"schedule.steps={steps}", "schedule.warmup=1", "checkpoint.every=2",
            "checkpoint.keep=2", "log_every=1", *extra]


def launch(out, data: dict, nproc: int, *extra, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, data, nproc, *extra, **kwargs), env=ENV, capture_output=True, text=True,
                          timeout=240, cwd=REPO)


class Started:
    """A launch begun now and collected later (output in files, so that no full pipe stalls it)."""

    def __init__(self, folder, data: dict, nproc: int, *extra, **kwargs):
        folder.mkdir(parents=True)
        self.logs = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.logs[0], "w") as out, open(self.logs[1], "w") as err:
            self.proc = subprocess.Popen(command(folder / "run", data, nproc, *extra, **kwargs), env=ENV, stdout=out,
                                         stderr=err, text=True, cwd=REPO)
        self.out = folder / "run"

    def result(self) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=240)
        finally:
            self.proc.kill()
        return subprocess.CompletedProcess(self.proc.args, rc, *(log.read_text() for log in self.logs))


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def history(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"step"' in line]


def user_error(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a refused run (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def dp2_zero1_run(tmp_path_factory, dataset):  # noqa: F811
    """Two ranks, ZeRO-1, 2 steps, a checkpoint at step 2; started at once, collected when needed."""
    started = Started(tmp_path_factory.mktemp("dp2") / "dp2", dataset, 2, zero=1, steps=2)
    yield started
    started.proc.kill()


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory, dataset, dp2_zero1_run):  # noqa: F811
    """One rank, ZeRO-0, 4 steps, checkpoints at steps 2 and 4. It trains alongside the DP=2 run
    (fixture dp2_zero1_run), so that on a 2-core machine their start-ups overlap."""
    out = tmp_path_factory.mktemp("zero0") / "run"
    ok(launch(out, dataset, 1))
    return out


def copy_run(run, to):
    shutil.copytree(run / "checkpoints", to / "checkpoints")
    return to / "checkpoints"


def test_a_pickled_payload_is_refused_not_run(zero0_run, dataset, tmp_path):  # noqa: F811
    ckpt = copy_run(zero0_run, tmp_path)
    victim = ckpt / "step00000004" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    states = load_weights_only(str(victim))  # the client state (RNG as lists, tuples) loads weights-only
    assert isinstance(states["rng_states"][0]["python"], tuple)
    torch.save({**states, "extra": Payload()}, victim)
    line = user_error(launch(tmp_path, dataset, 1, "--resume", "auto"))
    assert str(victim) in line and "refused (unpickling it would call exec)" in line
    assert not marker.exists()


def test_a_broken_newest_checkpoint_falls_back_to_the_previous(zero0_run, dataset, tmp_path):  # noqa: F811
    ckpt = copy_run(zero0_run, tmp_path)
    victim = ckpt / "step00000004" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = launch(tmp_path, dataset, 1, "--resume", "auto")
    ok(result)
    assert "resume: skipped step00000004 (unreadable file mp_rank_00_model_states.pt (truncated?)" in result.stdout
    full, resumed = history(zero0_run), history(tmp_path)
    assert [h["step"] for h in resumed] == [3, 4]  # from step 2
    for a, b in zip(full[2:], resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    # nothing usable: one line naming the folder
    os.remove(ckpt / "step00000002" / "mp_rank_00_model_states.pt")
    os.remove(ckpt / "step00000004" / "mp_rank_00_model_states.pt")  # (the run re-saved step 4)
    line = user_error(launch(tmp_path, dataset, 1, "--resume", "auto"))
    assert f"no usable complete checkpoint in {ckpt}" in line and "missing file mp_rank_00" in line


def test_a_zero0_checkpoint_resumes_on_two_ranks(zero0_run, dataset, tmp_path):  # noqa: F811
    """DeepSpeed loads ZeRO-0 at any DP size (was: IndexError on rank 1 for its RNG state)."""
    copy_run(zero0_run, tmp_path)
    result = launch(tmp_path, dataset, 2, "--resume", "auto")  # at step 4 of 4: restores, exports, trains nothing
    ok(result)
    assert "resume: step00000004 was saved by 1 ranks (TP=1 PP=1 DP=1 ZeRO-0), this run has 2" in result.stdout
    ours = load_file(str(tmp_path / "export" / "model.safetensors"))
    theirs = load_file(str(zero0_run / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_dp2_zero1_checkpoint_at_dp1_names_the_portable_route(dataset, dp2_zero1_run, tmp_path):  # noqa: F811
    ok(dp2_zero1_run.result())
    ckpt = dp2_zero1_run.out / "checkpoints"
    line = user_error(launch(dp2_zero1_run.out, dataset, 1, "--resume", "auto", zero=1))
    assert "layout changed" in line and "TP=1 PP=1 DP=2 ZeRO-1" in line and "TP=1 PP=1 DP=1 ZeRO-1" in line
    assert f"to-portable {ckpt} PORTABLE --tag step00000002" in line
    # the route: to-portable, then resume from it on one rank
    assert convert(["to-portable", str(ckpt), str(tmp_path / "portable"), "--tag", "step00000002"]) == 0
    result = launch(tmp_path / "one", dataset, 1, "--resume", str(tmp_path / "portable"), zero=1)
    ok(result)
    assert f"resume: from the portable checkpoint {tmp_path / 'portable'}" in result.stdout
    steps = history(tmp_path / "one")
    assert [h["step"] for h in steps] == [3, 4]
    assert all(h["loss"] == h["loss"] and h["loss"] < 20 for h in steps)


def test_tag_checks_and_layout_rules(tmp_path):
    """What resume checks before DeepSpeed reads a tag, file by file, and which layout changes
    DeepSpeed can load across (ZeRO-0 at any DP size; nothing across TP, PP or ZeRO partitions)."""
    from vlmo_large.checkpoint.resume_checks import layout_change, saved_layout, tag_problem

    tag = tmp_path / "step00000002"
    tag.mkdir()
    layout = {"tp": 1, "pp": 1, "dp": 2, "zero": 1}
    (tag / "COMPLETE").write_text(json.dumps({"step": 2, "layout": layout}))
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"x": torch.zeros(100)}, tag / name)
    assert saved_layout(str(tag)) == layout
    assert tag_problem(str(tag)) == "missing file zero_pp_rank_1_mp_rank_00_optim_states.pt"
    second = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    second.write_bytes(b"")
    assert tag_problem(str(tag)) == f"empty file {second.name}"
    torch.save({"x": torch.zeros(100)}, second)
    assert tag_problem(str(tag)) is None
    second.write_bytes(second.read_bytes()[:-30])
    assert tag_problem(str(tag)).startswith(f"unreadable file {second.name} (truncated?)")

    now = dict(layout, dp=1)
    assert layout_change(layout, now) == ["dp"]
    assert layout_change(dict(layout, zero=0, dp=1), dict(now, zero=0, dp=4)) == []
    assert layout_change(dict(layout, zero=3), dict(layout, zero=3, tp=2)) == ["tp"]
    assert layout_change(dict(layout, zero=None), dict(layout, zero=2)) == []  # ZeRO-1/2 from file names
    assert layout_change(dict(layout, zero=1), dict(layout, zero=3)) == ["zero"]
