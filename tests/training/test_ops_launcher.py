"""The real launcher under operational faults (subprocesses, tiny preset, random data, one process
unless stated): a stop signal checkpoints at the next step and `--resume auto` continues exactly,
a second run into a busy output folder is refused, divergence stops with one line naming the step,
and user errors anywhere in the run (--init, resume) are one line with exit status 2."""
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import mlflow
import psutil
import pytest

from tests.conftest import seed_store
from tests.training.conftest import REPO
from vlmo_large.data.shard_list import expand_shards

LAUNCHER = os.path.join(REPO, "launchers", "pretrain.py")
DS = os.path.join(REPO, "ds_configs", "cpu_fp32_zero0.json")
DEADLINE = 300  # generous: the machine may be busy; every wait ends on an event well before this


def launcher_args(out, *extra, ds=DS, threads=True):
    return [LAUNCHER, "--ds_config", ds, *(["--threads", "1"] if threads else []), "preset=tiny", "stage=vl",
            "data.source=random", "batch.micro=2", "schedule.warmup=1", "log_every=1", "checkpoint.every=0",
            f"output_dir={out}", *extra]


def env(**extra):
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return dict(base, PYTHONPATH=REPO, MLFLOW_DISABLE_TELEMETRY="true", **extra)


class Launch:
    """A launcher process whose merged output is read line by line as it comes (a pipe, not a terminal)."""

    def __init__(self, args, torchrun: int = 0):
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
            if torchrun else [sys.executable]
        self.proc = subprocess.Popen(prefix + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env=env(OMP_NUM_THREADS="1") if torchrun else env())
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str) -> re.Match:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        self.proc.kill()
        raise AssertionError(f"never printed {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def finish(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=DEADLINE)
        finally:
            self.proc.kill()
        while (line := self._queue.get(timeout=DEADLINE)) is not None:
            self.lines.append(line)
        return rc, "\n".join(self.lines)


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(args, timeout=DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env())


class Background:
    """A one-process run started now and collected later; output goes to files, so that several
    run side by side without a full pipe stalling one."""

    def __init__(self, args, folder):
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, cwd=REPO,
                                         env=env())

    def result(self) -> subprocess.CompletedProcess:
        try:
            rc = self.proc.wait(timeout=DEADLINE)
        finally:
            self.proc.kill()
        return subprocess.CompletedProcess(self.proc.args, rc, self.stdout.read_text(), self.stderr.read_text())


def stopped_step(log: str, signal_name: str) -> int:
    (step,) = re.findall(rf"stopped at step (\d+) on {signal_name}: checkpoint step\d+ written", log)
    return int(step)


# -- items 7, 8b (lock), 8c (metrics.jsonl) -----------------------------------------------------------
def test_sigterm_checkpoints_at_the_next_step_and_resume_auto_continues_exactly(tmp_path, store_template):
    out, reference_out = tmp_path / "run", tmp_path / "reference"
    steps = "schedule.steps=1000"  # never reached: every run here ends on a signal
    seed_store(store_template, out / "mlflow.db")  # a migrated empty store: no migrations in the run
    first = Launch(launcher_args(out, steps))
    # the uninterrupted run to compare with, trained alongside (it stops past the resumed run's last step)
    reference = Launch(launcher_args(reference_out, steps, "tracking_uri=none"))
    # (a second run into the busy folder is refused: test_a_signal_to_one_rank_stops_every_rank_at_the_same_step)
    first.wait_for(r"^step 1/1000 ")
    first.proc.send_signal(signal.SIGTERM)
    rc, log = first.finish()
    assert rc == 0, log[-3000:]
    assert "threads: 1 torch threads per rank (--threads)" in log
    assert "\r" not in log  # a pipe: plain progress lines, no redrawn bar
    stop = stopped_step(log, "SIGTERM")
    assert 2 <= stop < 1000
    tag = out / "checkpoints" / f"step{stop:08d}"
    assert (tag / "COMPLETE").is_file() and (out / "checkpoints" / "latest").read_text() == tag.name
    assert [m["step"] for m in metrics(out)] == list(range(1, stop + 1))  # written as it went, every step
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (tracked,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert tracked.info.status == "KILLED"

    resumed = Launch(launcher_args(out, steps, "--resume", "auto"))
    resumed.wait_for(rf"resumed from {tag.name} at step {stop}")
    resumed.wait_for(rf"^step {stop + 2}/1000 ")
    resumed.proc.send_signal(signal.SIGUSR1)
    rc, log = resumed.finish()
    assert rc == 0, log[-3000:]
    end = stopped_step(log, "SIGUSR1")

    reference.wait_for(rf"^step {end}/1000 ")
    reference.proc.send_signal(signal.SIGTERM)
    assert reference.finish()[0] == 0
    got, want = metrics(out), {m["step"]: m for m in metrics(reference_out)}
    assert [m["step"] for m in got] == list(range(1, end + 1))  # the resume appended, no step twice
    for m in got:
        for key, value in m.items():
            assert value == pytest.approx(want[m["step"]][key], rel=0, abs=1e-6), (m["step"], key)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    out, zero1 = tmp_path / "run", os.path.join(REPO, "ds_configs", "cpu_fp32_zero1.json")
    launch = Launch(launcher_args(out, "schedule.steps=1000", "tracking_uri=none", ds=zero1), torchrun=2)
    launch.wait_for(r"^threads: ")  # printed once rank 0 holds the output folder's lock
    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(launch.proc.pid).children(recursive=True)
             if "pretrain.py" in " ".join(p.cmdline())}
    assert set(ranks) == {0, 1}

    # a second 2-rank run into the busy folder: rank 0 finds the lock taken, both ranks exit 2, one line
    # naming the process that holds it (the first run's rank 0)
    refused = Launch(launcher_args(out, "schedule.steps=1000", "tracking_uri=none", ds=zero1), torchrun=2)
    rc, log = refused.finish()
    # torchrun's failure report has one "exitcode  : N (pid: P)" entry per rank. Each rank exits 2,
    # unless torchrun's teardown (it SIGTERMs the others once one rank has exited) got there first
    codes = re.findall(r"exitcode\s+:\s*(-?\d+) \(pid", log)
    assert rc != 0 and len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, log[-3000:]
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1, log
    assert errors[0].startswith(f"error: output_dir {out} is in use by another run (pid {ranks[0].pid} on "), log
    launch.wait_for(r"^step 1/1000 ")
    assert launch.proc.poll() is None  # the first run trains on
    ranks[1].send_signal(signal.SIGUSR1)  # rank 0 is never signalled: it learns it in the step's all-reduce
    rc, log = launch.finish()
    assert rc == 0, log[-3000:]
    stop = stopped_step(log, "a signal to another rank")
    checkpoint = out / "checkpoints" / f"step{stop:08d}"
    assert (checkpoint / "COMPLETE").is_file()
    # both ranks wrote their part of the same step's checkpoint (ZeRO-1: one optimizer shard each)
    assert len(list(checkpoint.glob("*optim_states.pt"))) == 2
    assert [m["step"] for m in metrics(out)] == list(range(1, stop + 1))


# -- item 8b: divergence ------------------------------------------------------------------------------
def test_divergence_stops_with_one_line_naming_the_first_non_finite_step(one_shot_runs):
    out = one_shot_runs["folder"] / "diverge" / "run"
    result = one_shot_runs["diverge"].result()
    assert result.returncode == 2, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (tracked,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert tracked.info.status == "FAILED"
    history = metrics(out)
    first_bad = next(m["step"] for m in history if not math.isfinite(m["loss"]))
    assert history[-1]["step"] == first_bad and all(math.isfinite(m["loss"]) for m in history[:-1])
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: step {first_bad}: non-finite loss (") and "training diverged" in last


# -- user errors anywhere in a run: one line, exit 2 ----------------------------------------------------
def _one_error_line(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


def broken_weights(tmp_path):
    """A weights file that exists (config validation passes) but cannot be read: fails mid-run, in the model build."""
    path = tmp_path / "broken" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"not a safetensors file" * 10)
    return path


def test_bad_init_on_two_ranks_is_one_line_and_no_worker_traceback(one_shot_runs):
    broken = one_shot_runs["broken"]
    rc, log = one_shot_runs["bad_init_two_ranks"].finish()
    assert rc != 0
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(broken) in errors[0], log[-3000:]
    assert "stage vl:" not in log  # it did fail in the model build, after the process group existed
    assert 'launchers/pretrain.py", line' not in log and "[rank" not in log  # torchrun's own report only
    assert re.search(r"exitcode\s*:\s*2", log), log[-3000:]  # both workers exited 2


def test_without_a_thread_setting_the_launcher_uses_the_cores_it_may_use(one_shot_runs):
    result = one_shot_runs["shards"].result()  # a plain process, no OMP_NUM_THREADS and no --threads
    assert result.returncode == 0, result.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    assert f"threads: {cores} torch threads per rank ({cores} cores / 1 local rank)" in result.stdout, result.stdout


def test_resume_over_changed_shards_is_one_line_and_exit_2(one_shot_runs, dataset):
    out = one_shot_runs["folder"] / "shards" / "run"
    shards = dataset["image_text"]["train"]
    first = one_shot_runs["shards"].result()
    assert first.returncode == 0, first.stderr[-3000:]
    changed = "data.shards=" + json.dumps(expand_shards(shards)[:-1])  # one shard fewer than the checkpoint's
    result = run(launcher_args(out, *shard_run_args(dataset), changed, "schedule.steps=4", "--resume", "auto"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert _one_error_line(result.stderr).startswith("error: resume: ")


def shard_run_args(dataset) -> list[str]:
    return ["schedule.steps=2", "tracking_uri=none", "data.source=shards", f"data.tokenizer={dataset['tokenizer']}",
            "data.augment=light"]


@pytest.fixture(scope="module")
def one_shot_runs(tmp_path_factory, dataset, store_template):
    """The runs of this module that end by themselves (divergence, a broken --init on two ranks, the
    first run of the changed-shards resume, which also chooses its own thread count), started together
    when the first is needed: on a 2-core machine their start-ups (imports, process groups) overlap
    instead of adding up."""
    root = tmp_path_factory.mktemp("one_shot")
    broken = broken_weights(root)
    shards = f"data.shards={dataset['image_text']['train']}"
    seed_store(store_template, root / "diverge" / "run" / "mlflow.db")
    runs = {
        "diverge": Background(launcher_args(root / "diverge" / "run", "schedule.steps=30", "optim.lr=10000"),
                              root / "diverge"),
        "bad_init_two_ranks": Launch(launcher_args(root / "bad_init_two_ranks" / "run", "schedule.steps=2",
                                                   "tracking_uri=none", f"--init={broken}",
                                                   ds=os.path.join(REPO, "ds_configs", "cpu_fp32_zero1.json")),
                                     torchrun=2),
        # no OMP_NUM_THREADS, no --threads: the launcher chooses the thread count itself
        "shards": Background(launcher_args(root / "shards" / "run", *shard_run_args(dataset), shards, threads=False),
                             root / "shards"),
    }
    yield {"folder": root, "broken": broken, **runs}
    for launched in runs.values():
        launched.proc.kill()
