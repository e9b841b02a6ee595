"""benchmarks/profile_breakdown.py: the step's time by category, from a torch.profiler chrome trace.

CPU: a real profile of one tiny training step (objective forward, backward, fused AdamW), checked
against torch's own per-op self times (key_averages). GPU: a hand-made trace whose kernel times,
idle gaps and host syncs are computed by hand."""
import json
import os
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from profile_breakdown import CATEGORIES, category, format_breakdown, summarize_trace  # noqa: E402

from tests.conftest import randomize_  # noqa: E402
from tests.parallel.layout_worker import global_batch  # noqa: E402
from vlmo_large.model import build_model  # noqa: E402
from vlmo_large.training.objectives import TaskObjective  # noqa: E402

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(build_model("tiny")).train()
    objective = TaskObjective(model, "vl")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = global_batch(model.cfg)

    def step():
        out = objective(batch, step=0)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # first-call costs out of the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("ProfilerStep#0"):
            step()
    path = tmp_path_factory.mktemp("prof") / "trace.json"
    prof.export_chrome_trace(str(path))
    return json.loads(path.read_text()), prof.key_averages()


def test_cpu_categories_match_torch_self_times(cpu_profile):
    trace, averages = cpu_profile
    b = summarize_trace(trace)
    assert b["kind"] == "cpu"
    rows = [a for a in averages if not a.key.startswith("ProfilerStep")]  # torch names it "ProfilerStep*"
    torch_self_ms = sum(a.self_cpu_time_total for a in rows) / 1e3
    torch_gemm_ms = sum(a.self_cpu_time_total for a in rows if a.key in GEMM_OPS) / 1e3
    assert b["in_ops_ms"] == pytest.approx(torch_self_ms, rel=0.02)
    assert b["categories_ms"]["GEMM"] == pytest.approx(torch_gemm_ms, rel=0.02)
    assert b["categories_ms"]["GEMM"] > 0 and b["categories_ms"]["optimizer"] > 0
    # the categories and the time outside ops add up to the profiled step
    step = next(a for a in averages if a.key.startswith("ProfilerStep")).cpu_time_total / 1e3
    assert b["step_ms"] == pytest.approx(step, rel=0.02)
    assert sum(b["categories_ms"].values()) + b["outside_ops_ms"] == pytest.approx(b["step_ms"], rel=0.02)
    # key_averages folds some nested same-name calls (aten::add_ inside aten::add_): close, not equal
    assert b["aten_ops"] == pytest.approx(sum(a.count for a in rows if a.key.startswith("aten::")), rel=0.05)
    assert 0 < b["aten_leaf_ops"] < b["aten_ops"]
    assert "aten ops dispatched" in format_breakdown(b)


def test_names_fall_into_their_categories():
    expect = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNT": "GEMM", "aten::addmm": "GEMM",
        "ncclDevKernel_AllGather_RING_LL": "communication", "c10d::allreduce_": "communication",
        "gloo:all_reduce": "communication",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::_softmax": "attention",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "memory-bound",
        "aten::log_softmax": "memory-bound", "aten::broadcast_tensors": "memory-bound",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
        "aten::_fused_adamw_": "optimizer", "cudaStreamSynchronize": "host sync", "aten::item": "host sync",
    }
    assert {name: category(name) for name in expect} == expect


def test_gpu_trace_kernel_times_gaps_and_syncs():
    def ev(name, ts, dur, cat, **args):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 0, "tid": 1, "args": args}

    events = [
        ev("ProfilerStep#0", 100, 100, "user_annotation"),
        ev("aten::mm", 101, 5, "cpu_op"), ev("cudaStreamSynchronize", 150, 30, "cuda_runtime"),
        ev("sm90_xmma_gemm_bf16", 110, 10, "kernel", stream=7),         # 110-120
        ev("flash_fwd_kernel", 125, 10, "kernel", stream=7),             # gap 5, 125-135
        ev("vectorized_elementwise_kernel", 135, 5, "kernel", stream=7),  # no gap
        ev("Memcpy DtoH", 160, 4, "gpu_memcpy", stream=7),              # gap 20
        ev("ncclDevKernel_AllReduce", 120, 12, "kernel", stream=20),     # another stream: no gap counted
        ev("sm90_xmma_gemm_before_the_step", 50, 10, "kernel", stream=7),  # outside the step window
    ]
    b = summarize_trace({"traceEvents": events})
    assert b["kind"] == "gpu" and b["step_ms"] == pytest.approx(0.1)
    assert b["compute_stream"] == 7 and b["streams"] == 2 and b["kernels"] == 4
    assert b["idle_gaps_ms"] == pytest.approx(0.025)
    assert b["kernel_ms"] == pytest.approx(0.041)
    assert b["categories_ms"] == pytest.approx({"GEMM": 0.010, "attention": 0.010, "memory-bound": 0.009,
                                                "communication": 0.012, "optimizer": 0.0, "host sync": 0.0})
    assert b["host_syncs"] == 1 and b["host_sync_ms"] == pytest.approx(0.030)
    assert set(b["categories_ms"]) == set(CATEGORIES)
    assert "idle gaps" in format_breakdown(b)
