"""The launcher's operational pieces on their own: thread choice, plain progress lines off a
terminal, the metrics file kept across resumes, the output-folder lock, a failed checkpoint write."""
import io
import json
import os
import subprocess
import sys

import pytest

from tests.training.conftest import REPO
from vlmo_large.cpu_threads import choose_threads
from vlmo_large.errors import UserError
from vlmo_large.training.metrics_file import MetricsFile
from vlmo_large.training.output_lock import OutputLock
from vlmo_large.training.progress import Progress


# -- item 4: threads -------------------------------------------------------------------------------
@pytest.mark.parametrize("env, requested, expected", [
    ({}, None, (16, "16 cores / 1 local rank")),
    ({"LOCAL_WORLD_SIZE": "4"}, None, (4, "16 cores / 4 local ranks")),   # torchrun
    ({"LOCAL_SIZE": "8"}, None, (2, "16 cores / 8 local ranks")),         # DeepSpeed's launcher
    ({"LOCAL_WORLD_SIZE": "32"}, None, (1, "16 cores / 32 local ranks")),  # never 0
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, None, (3, "OMP_NUM_THREADS")),
    ({"OMP_NUM_THREADS": "3"}, 5, (5, "--threads")),
])
def test_thread_choice(env, requested, expected):
    # a 16-core CPU set (Slurm, taskset), whatever the host has
    assert choose_threads(env, requested, cores=16) == expected


def test_bad_thread_settings_are_user_errors():
    with pytest.raises(UserError, match="OMP_NUM_THREADS must be a positive integer, got 'many'"):
        choose_threads({"OMP_NUM_THREADS": "many"})
    with pytest.raises(UserError, match="--threads must be at least 1"):
        choose_threads({}, 0)


def test_default_counts_the_cores_this_process_may_use():
    probe = ("import os; from vlmo_large.cpu_threads import apply_threads, choose_threads; import torch; "
             "n, why = choose_threads({'LOCAL_SIZE': '1'}); apply_threads(n); "
             "print(n, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], why)")
    # pinned to one core, as a Slurm CPU set or taskset would: one thread, not one per host core
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120, check=True)
    assert out.stdout.split()[:3] == ["1", "1", "1"] and "1 cores / 1 local rank" in out.stdout


# -- item 8: progress off a terminal ---------------------------------------------------------------
def test_progress_to_a_pipe_is_plain_lines_every_log_every_steps():
    stream = io.StringIO()  # not a terminal, like a file under Slurm or a pipe in CI
    progress = Progress(total=10, start=0, enabled=True, log_every=4, stream=stream)
    progress.write("note")
    for step in range(1, 11):
        progress.update(step, {"loss": 1.0 / step}, samples_per_s=5.0, lr=1e-4,
                        skipped={"decode_error": 0} if step < 8 else {"decode_error": 2, "empty": 0})
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines == ["note",
                     "step 4/10 loss=0.2500 lr=1.000e-04 samples/s=5.00",
                     "step 8/10 loss=0.1250 lr=1.000e-04 samples/s=5.00 skipped decode_error=2",
                     "step 10/10 loss=0.1000 lr=1.000e-04 samples/s=5.00 skipped decode_error=2"]


def test_progress_on_other_ranks_prints_nothing():
    stream = io.StringIO()
    progress = Progress(total=4, start=0, enabled=False, log_every=1, stream=stream)
    progress.write("x")
    progress.update(1, {"loss": 1.0}, 1.0, 1e-4)
    assert stream.getvalue() == ""


# -- item 8c: metrics.jsonl ------------------------------------------------------------------------
def test_metrics_file_is_written_as_it_goes_and_a_resume_drops_later_steps(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsFile(path, start_step=0)
    for step in range(1, 6):
        log.append({"step": step, "loss": float(step)})
        # readable by another process after each step, before the run ends (a killed run keeps them)
        assert [json.loads(x)["step"] for x in open(path)] == list(range(1, step + 1))
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut off by kill -9
    resumed = MetricsFile(path, start_step=3)  # the checkpoint the run resumes from is step 3
    resumed.append({"step": 4, "loss": 40.0})
    resumed.close()
    assert [json.loads(x) for x in open(path)] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                                   {"step": 3, "loss": 3.0}, {"step": 4, "loss": 40.0}]
    MetricsFile(path, start_step=0).close()  # a fresh start describes a new run
    assert open(path).read() == ""


# -- item 8b: one run per output folder ------------------------------------------------------------
def test_output_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = OutputLock(str(tmp_path / "out"))
    first.acquire()
    with pytest.raises(UserError) as err:
        OutputLock(str(tmp_path / "out")).acquire()  # its own open file: flock conflicts as between processes
    assert str(err.value).startswith(f"output_dir {tmp_path / 'out'} is in use by another run (pid {os.getpid()} on ")
    first.release()
    second = OutputLock(str(tmp_path / "out"))
    second.acquire()
    second.release()


def test_output_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from vlmo_large.training.output_lock import "
                               f"OutputLock; lock = OutputLock({str(tmp_path)!r}); lock.acquire(); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {holder.pid} on "):
            OutputLock(str(tmp_path)).acquire()
        holder.kill()  # kill -9: no clean-up code runs
        holder.wait(timeout=60)
        OutputLock(str(tmp_path)).acquire()
    finally:
        holder.kill()


def test_loader_workers_run_one_thread_whatever_the_rank_chose():
    # the launcher leaves this to torch's worker loop (set_num_threads(1)); the data loader's workers
    # are torch DataLoader workers, so this holds for them
    probe = ("from vlmo_large.cpu_threads import apply_threads; import torch; apply_threads(2)\n"
             "class Threads(torch.utils.data.Dataset):\n"
             "    def __len__(self): return 2\n"
             "    def __getitem__(self, i): return torch.get_num_threads()\n"
             "print(torch.get_num_threads(), *torch.utils.data.DataLoader(Threads(), num_workers=1, batch_size=None))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO), timeout=120, check=True)
    assert out.stdout.split() == ["2", "1", "1"]


def test_output_lock_is_released_with_its_object(tmp_path):
    OutputLock(str(tmp_path)).acquire()  # dropped at once, as the launcher's lock when main() returns in-process
    OutputLock(str(tmp_path)).acquire()
