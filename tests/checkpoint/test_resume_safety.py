"""`--resume` through the launcher (real processes, tiny, ZeRO-0 as README's CPU config and
ZeRO-1 at DP=2): files are read weights-only (a pickled payload is refused, never run), a newest
checkpoint with a broken model file falls back to the previous one, a ZeRO-0 checkpoint resumes
on another number of ranks, and a ZeRO-1 DP=2 checkpoint (the session's zero1_launch run, shared
with test_launcher_resume) at DP=1 is one line naming `to-portable`, whose output then resumes. Every run's MLflow store starts as a copy of one migrated empty store."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import seed_store
from tests.training.conftest import REPO
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


def launch(out, data: dict, nproc: int, *extra, store, **kwargs) -> subprocess.CompletedProcess:
    seed_store(store, out / "mlflow.db")
    return subprocess.run(command(out, data, nproc, *extra, **kwargs), env=ENV, capture_output=True, text=True,
                          timeout=240, cwd=REPO)


class Started:
    """A launch begun now and collected later (output in files, so that no full pipe stalls it)."""

    def __init__(self, folder, data: dict, nproc: int, *extra, store, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        seed_store(store, folder / "run" / "mlflow.db")
        self.logs = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.logs[0], "w") as out, open(self.logs[1], "w") as err:
            self.proc = subprocess.Popen(command(folder / "run", data, nproc, *extra, **kwargs), env=ENV, stdout=out,
                                         stderr=err, text=True, cwd=REPO)
        self.out = folder / "run"

    def result(self) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=400)  # several launches share 2 cores here
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
def zero0_run(tmp_path_factory, dataset, zero1_launch, store_template):
    """One rank, ZeRO-0, 4 steps, checkpoints at steps 2 and 4. It trains alongside the DP=2 ZeRO-1
    run (the session fixture zero1_launch, started here), so that on 2 cores their start-ups overlap."""
    out = tmp_path_factory.mktemp("zero0") / "run"
    ok(launch(out, dataset, 1, store=store_template))
    return out


def copy_run(run, to):
    shutil.copytree(run / "checkpoints", to / "checkpoints")
    return to / "checkpoints"


@pytest.fixture(scope="module")
def resumes_of_zero0(zero0_run, dataset, tmp_path_factory, store_template):
    """The `--resume auto` launches over copies of zero0_run's checkpoints, each copy prepared as its
    test states, started together (their start-ups overlap) and collected by the tests:
    {name: (folder, started launch)}; the launch's output_dir is folder / "run"."""
    root = tmp_path_factory.mktemp("resumes_of_zero0")
    ckpts = {name: copy_run(zero0_run, root / name / "run")
             for name in ("pickled", "truncated", "nothing_usable", "two_ranks")}
    plant_pickled_payload(ckpts["pickled"] / "step00000004" / "mp_rank_00_model_states.pt", root / "pickled" / "pwned")
    victim = ckpts["truncated"] / "step00000004" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    for tag in ("step00000002", "step00000004"):
        os.remove(ckpts["nothing_usable"] / tag / "mp_rank_00_model_states.pt")
    runs = {name: (root / name, Started(root / name, dataset, 2 if name == "two_ranks" else 1, "--resume", "auto",
                                       store=store_template)) for name in ckpts}
    yield runs
    for _, started in runs.values():
        started.proc.kill()


def plant_pickled_payload(victim, marker):
    """Re-save a DeepSpeed file with an object whose unpickling would write `marker`."""
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    states = load_weights_only(str(victim))  # the client state (RNG as lists, tuples) loads weights-only
    assert isinstance(states["rng_states"][0]["python"], tuple)
    torch.save({**states, "extra": Payload()}, victim)


def test_a_pickled_payload_is_refused_not_run(resumes_of_zero0):
    folder, started = resumes_of_zero0["pickled"]
    victim = folder / "run" / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    marker = folder / "pwned"
    line = user_error(started.result())
    assert str(victim) in line and "refused (unpickling it would call exec)" in line
    assert not marker.exists()


def test_a_broken_newest_checkpoint_falls_back_to_the_previous(zero0_run, resumes_of_zero0):
    folder, started = resumes_of_zero0["truncated"]  # step 4's model file cut in half
    result = started.result()
    ok(result)
    assert "resume: skipped step00000004 (unreadable file mp_rank_00_model_states.pt (truncated?)" in result.stdout
    full, resumed = history(zero0_run), history(folder / "run")
    assert [h["step"] for h in resumed] == [3, 4]  # from step 2
    for a, b in zip(full[2:], resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)


def test_no_usable_checkpoint_is_one_line_naming_the_folder(resumes_of_zero0):
    folder, started = resumes_of_zero0["nothing_usable"]  # the model files of steps 2 and 4 removed
    line = user_error(started.result())
    ckpt = folder / "run" / "checkpoints"
    assert f"no usable complete checkpoint in {ckpt}" in line and "missing file mp_rank_00" in line


def test_a_zero0_checkpoint_resumes_on_two_ranks(zero0_run, resumes_of_zero0):
    """DeepSpeed loads ZeRO-0 at any DP size (was: IndexError on rank 1 for its RNG state)."""
    folder, started = resumes_of_zero0["two_ranks"]  # at step 4 of 4: restores, exports, trains nothing
    result = started.result()
    ok(result)
    assert "resume: step00000004 was saved by 1 ranks (TP=1 PP=1 DP=1 ZeRO-0), this run has 2" in result.stdout
    ours = load_file(str(folder / "run" / "export" / "model.safetensors"))
    theirs = load_file(str(zero0_run / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_dp2_zero1_checkpoint_at_dp1_names_the_portable_route(dataset, zero1_launch, tmp_path,
                                                               store_template):
    run, started = zero1_launch  # 2 ranks, 4 steps, checkpoints at steps 2 and 4 (read-only: copied)
    started.result()
    ckpt = copy_run(run, tmp_path / "dp2")
    line = user_error(launch(tmp_path / "dp2", dataset, 1, "--resume", "auto", zero=1, store=store_template))
    assert "layout changed" in line and "TP=1 PP=1 DP=2 ZeRO-1" in line and "TP=1 PP=1 DP=1 ZeRO-1" in line
    assert f"to-portable {ckpt} PORTABLE --tag step00000004" in line
    # the route: to-portable, then resume from it on one rank (with the run's augmentation, 2 more steps)
    assert convert(["to-portable", str(ckpt), str(tmp_path / "portable"), "--tag", "step00000004"]) == 0
    result = launch(tmp_path / "one", dataset, 1, "data.augment=light", "--resume", str(tmp_path / "portable"),
                    zero=1, steps=6, store=store_template)
    ok(result)
    assert f"resume: from the portable checkpoint {tmp_path / 'portable'}" in result.stdout
    steps = history(tmp_path / "one")
    assert [h["step"] for h in steps] == [5, 6]
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
