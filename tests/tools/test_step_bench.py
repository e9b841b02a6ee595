"""benchmarks/step_bench.py on the trainer's own step (tiny preset, ZeRO-3, one process): a row's
numbers, and the host-sync check's attribution of syncs to the step's phases (on a CPU, with
torch.cuda.set_sync_debug_mode replaced by a stand-in that reports a sync from engine.step)."""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import step_bench  # noqa: E402
from tests.training.common import destroy_one_process_group  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    args = step_bench.parse_args(["--preset", "tiny", "--batch", "2,4", "--zero", "3", "--steps", "2"])
    trainer = step_bench.build_trainer(args)
    yield args, trainer
    destroy_one_process_group()  # DeepSpeed's cached world group too: later modules build their own


def test_row_numbers_follow_from_the_step_time_and_the_flop_formula(bench):
    from vlmo_large.training.step_flops import step_flops

    args, trainer = bench
    assert args.batches == [2, 4] and trainer.engine.zero_optimization_stage() == 3
    row = step_bench.run_batch(trainer, args, 2, {"torch": "t", "deepspeed": "d"})
    assert row["status"] == "ok" and row["steps"] == 2 and row["fastest_s"] <= row["s_step"] <= row["slowest_s"]
    assert row["samples_s"] == pytest.approx(2 / row["s_step"])
    sample = next(step_bench.batch_source(trainer, args, 2))  # the same first batch (seeded)
    assert row["gflop_step"] == pytest.approx(step_flops(trainer.resolved.model, "vl", sample) / 1e9)
    assert row["tflops"] == pytest.approx(row["gflop_step"] / 1e3 / row["s_step"])
    assert row["mfu"] is None and "peak memory" not in step_bench.describe(row)  # a CPU: no peak


def test_sync_check_names_the_phase_and_confirms_a_clean_step(bench, monkeypatch):
    args, trainer = bench
    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(now=m))
    real_step = trainer.engine.step

    def syncing_step(*a, **k):
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation")
        return real_step(*a, **k)

    monkeypatch.setattr(trainer.engine, "step", syncing_step)
    found = step_bench.sync_check(trainer, step_bench.batch_source(trainer, args, 2))
    assert found["syncs"] == 1 and "error_mode" not in found
    assert [(s["phase"], s["count"]) for s in found["sites"]] == [("optimizer", 1), ("metrics", 1)]
    assert "test_step_bench.py" in found["sites"][0]["where"]
    monkeypatch.setattr(trainer.engine, "step", real_step)
    clean = step_bench.sync_check(trainer, step_bench.batch_source(trainer, args, 2))
    assert clean["syncs"] == 0 and clean["error_mode"] == "passed"


def test_compile_mode_reaches_the_model_config_and_needs_compile():
    args = step_bench.parse_args(["--preset", "tiny", "--compile", "--compile-mode", "reduce-overhead"])
    model = step_bench.run_config(args, 2).model
    assert model["compile"] is True and model["compile_mode"] == "reduce-overhead"  # overrides of ModelConfig
    assert "compile_mode" not in step_bench.run_config(step_bench.parse_args(["--preset", "tiny"]), 2).model
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--preset", "tiny", "--compile-mode", "reduce-overhead"])
