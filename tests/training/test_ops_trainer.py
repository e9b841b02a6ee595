"""The training loop in this process (one rank, tiny, random data): a checkpoint write that fails
(a real full disk when a tmpfs can be mounted here, else torch's own write error) is one line and
leaves the folder resumable; skip counts reach metrics.jsonl and the console; run totals are logged."""
import json
import subprocess

import pytest

from tests.training.common import ONE_PROCESS_DS, Recorder, destroy_one_process_group, run_config
from vlmo_large.formats.io import CheckpointError
from vlmo_large.training import checkpointing
from vlmo_large.training.random_batches import RandomBatches
from vlmo_large.training.trainer import Trainer
from vlmo_large.training.validation import resolve_run

DS = ONE_PROCESS_DS



def train(out, tracker=None, **overrides):
    cfg = run_config(str(out), **{"schedule.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 3,
                                  "checkpoint.export": False, "log_every": 1, **overrides})
    return Trainer(cfg, resolve_run(cfg, DS, 1), tracker=tracker).run()


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """The trainers of this module share one in-memory process group, as dist_worker.py's do
    (DeepSpeed keeps the first group it saw); it is taken down after the last one, and whatever an
    earlier module left is taken down before the first."""
    destroy_one_process_group()
    yield
    destroy_one_process_group()


@pytest.fixture
def small_disk(tmp_path):
    """A 11 MB tmpfs: one tiny checkpoint (7.4 MB) fits, the second runs out of space mid-write."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); test_failed_write_* below covers the same path")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a failed write may still hold a file open


def _assert_one_line_and_resumable(err, ckpt_dir):
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"step 4: writing checkpoint {ckpt_dir}/step00000004 failed (")
    assert message.endswith("the previous checkpoint step00000002 is intact and --resume auto continues from it")
    assert checkpointing.find_resume_tag(str(ckpt_dir)) == (str(ckpt_dir), "step00000002")


def test_disk_full_while_checkpointing_is_one_line_and_the_folder_stays_resumable(tmp_path, small_disk):
    ckpt_dir = small_disk / "checkpoints"
    with pytest.raises(CheckpointError) as err:
        train(tmp_path / "run", **{"checkpoint.dir": str(ckpt_dir)})
    _assert_one_line_and_resumable(err, ckpt_dir)


def test_failed_write_while_checkpointing_is_one_line_and_the_folder_stays_resumable(tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    real_save = TorchCheckpointEngine.save

    def save(self, state_dict, path):
        if "step00000004" in path:  # what torch.save raises when the disk fills up under it
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial")
            raise RuntimeError(f"[enforce fail at inline_container.cc:626] . unexpected pos 1536 vs 1462")
        return real_save(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", save)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    with pytest.raises(CheckpointError) as err:
        train(tmp_path / "run")
    _assert_one_line_and_resumable(err, ckpt_dir)


def test_skip_counts_reach_metrics_jsonl_and_the_console_and_run_totals_are_logged(tmp_path, monkeypatch, capsys):
    def skip_counts(self):  # a loader that skipped 3 undecodable images while making its second batch
        return {"decode_error": 3 if self.index >= 2 else 0, "empty_caption": 0}

    monkeypatch.setattr(RandomBatches, "skip_counts", skip_counts)
    tracker = Recorder()
    history = train(tmp_path / "run", tracker)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert "data/skipped_decode_error" not in lines[0]
    assert all(m["data/skipped_decode_error"] == 3 for m in lines[1:])
    assert not any("data/skipped_empty_caption" in m for m in lines)  # zero counts stay out
    console = capsys.readouterr().out
    assert "\r" not in console  # pytest's capture is not a terminal: plain lines
    steps = [line for line in console.splitlines() if line.startswith("step ")]
    assert len(steps) == 4 and " skipped " not in steps[0]
    assert [line.split(" skipped ")[-1] for line in steps[1:]] == ["decode_error=3"] * 3
    (step, totals), = [(s, m) for s, m in tracker.metrics if "run/total_time_s" in m]
    rates = [m["samples_per_s"] for _, m in tracker.metrics if "samples_per_s" in m]
    assert step == 4 and len(history) == len(rates) == 4
    # mean throughput = all samples / all step time = the harmonic mean of the per-step rates
    assert totals["run/mean_samples_per_s"] == pytest.approx(4 / sum(1 / r for r in rates), rel=1e-6)
    batch = 2  # run_config's micro-batch on one rank
    assert totals["run/total_time_s"] > sum(batch / r for r in rates)  # the whole run: its steps and more
