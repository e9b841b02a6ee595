"""launchers/slurm_pretrain.sbatch under bash with stand-ins for Slurm and DeepSpeed: it asks for a
signal before the time limit, resumes with `--resume auto` unless told otherwise, passes a signal
on to the ranks and requeues the job once the ranks have checkpointed and exited."""
import os
import signal
import stat
import subprocess
import time

from tests.training.conftest import REPO

SCRIPT = os.path.join(REPO, "launchers", "slurm_pretrain.sbatch")

# deepspeed: records its arguments, then runs until "ranks stopped" exists (pkill's stand-in makes it)
STUBS = {
    "deepspeed": 'echo "$@" > "$STUB_LOG/deepspeed"\nwhile [ ! -e "$STUB_LOG/ranks_stopped" ]; do sleep 0.1; done\n',
    "pkill": 'echo "$@" > "$STUB_LOG/pkill"\ntouch "$STUB_LOG/ranks_stopped"\n',
    "scontrol": 'if [ "$1" = show ]; then echo node1; else echo "$@" > "$STUB_LOG/scontrol"; fi\n',
}


def stubbed(tmp_path, *args, stop_at_once=False):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    if stop_at_once:
        (log / "ranks_stopped").touch()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node1", SLURM_GPUS_ON_NODE="8")
    proc = subprocess.Popen(["bash", SCRIPT, "ds.json", "run.yaml", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


def wait_for_file(path, proc, deadline=60):
    end = time.monotonic() + deadline
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < end, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)


def test_asks_for_a_signal_before_the_time_limit_and_to_be_requeueable():
    lines = open(SCRIPT).read().splitlines()
    assert "#SBATCH --signal=B:USR1@600" in lines and "#SBATCH --requeue" in lines


def test_signal_is_passed_to_the_ranks_then_the_job_requeues_and_resumes_automatically(tmp_path):
    proc, log = stubbed(tmp_path, "preset=large")
    wait_for_file(log / "deepspeed", proc)
    assert (log / "deepspeed").read_text().split()[-4:] == ["run.yaml", "--resume", "auto", "preset=large"]
    proc.send_signal(signal.SIGUSR1)  # what Slurm sends 10 minutes before the limit
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (log / "pkill").read_text().split() == ["-USR1", "-u", str(os.getuid()), "-f",
                                                   "launchers/pretrain.py", "--local_rank="]
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]


def test_a_run_that_ends_by_itself_is_not_requeued_and_an_explicit_resume_is_kept(tmp_path):
    proc, log = stubbed(tmp_path, "resume=null", stop_at_once=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--resume" not in (log / "deepspeed").read_text().split()
    assert not (log / "scontrol").exists() and not (log / "pkill").exists()
