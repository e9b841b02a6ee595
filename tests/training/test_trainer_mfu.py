"""The trainer logs perf/tflops_per_gpu every log step, from step_flops over the step's
micro-batches (one rank in this process, tiny, random data); no perf/mfu without a known peak (CPU)."""
import pytest

from tests.training.common import ONE_PROCESS_DS, Recorder, destroy_one_process_group, run_config
from vlmo_large.tasks.registry import get_task
from vlmo_large.training.random_batches import RandomBatches
from vlmo_large.training.step_flops import step_flops
from vlmo_large.training.trainer import Trainer
from vlmo_large.training.validation import resolve_run

DS = ONE_PROCESS_DS



@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    yield
    destroy_one_process_group()


def test_tflops_per_gpu_are_the_steps_flops_over_its_time(tmp_path):
    steps, micro, accum = 3, 2, 2
    cfg = run_config(str(tmp_path / "run"), **{"schedule.steps": steps, "checkpoint.every": 0,
                                               "checkpoint.export": False, "log_every": 1,
                                               "batch.micro": micro, "batch.grad_accum": accum})
    resolved = resolve_run(cfg, DS, 1)
    recorder = Recorder()
    Trainer(cfg, resolved, tracker=recorder).run()
    logged = {step: m for step, m in recorder.metrics if "loss" in m}
    assert sorted(logged) == [1, 2, 3]
    # the trainer's batches, drawn again: batch i of rank 0 is a function of (seed, rank, i)
    batches = iter(RandomBatches(get_task(cfg.stage).data_kind, resolved.model, micro, cfg.seed, 0, cfg.data.mlm_prob,
                                 cfg.data.mim_ratio))
    for step in range(1, steps + 1):
        flops = sum(step_flops(resolved.model, cfg.stage, next(batches)) for _ in range(accum))
        metrics = logged[step]
        seconds = resolved.global_batch / metrics["samples_per_s"]  # the step's wall time, as logged
        assert metrics["perf/tflops_per_gpu"] > 0
        assert metrics["perf/tflops_per_gpu"] * 1e12 * seconds == pytest.approx(flops, rel=1e-6)
        assert "perf/mfu" not in metrics  # a CPU has no known peak
