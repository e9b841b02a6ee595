"""benchmarks/gpu_ladder.py and ladder_table.py: the rows a GPU and a dry run execute, a row that
hangs or crashes, and the markdown for RESULTS.md from step_bench's JSON lines."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import gpu_ladder  # noqa: E402
from ladder_table import markdown, table_row  # noqa: E402


def test_gpu_rows_run_bf16_with_the_cluster_zero_settings_and_the_target_row_first():
    first = gpu_ladder.row_args(gpu_ladder.ROWS[0][1], "/o", dry_run=False)
    assert first[:2] == ["--preset", "large"] and "--compile" in first and "--profile" in first
    assert first[first.index("--profile") + 1] == "/o/profile"
    assert first[first.index("--zero") + 1] == "2" and first[first.index("--dtype") + 1] == "bf16"
    assert first[first.index("--ds-config") + 1] == gpu_ladder.CLUSTER_FILE and os.path.isfile(gpu_ladder.CLUSTER_FILE)


def test_cuda_graph_and_packed_rows_run_last_and_reach_step_bench_as_options():
    graphs, packed = (gpu_ladder.row_args(spec, "/o", dry_run=False) for _, spec, _, _ in gpu_ladder.ROWS[-2:])
    assert graphs[graphs.index("--compile-mode") + 1] == "reduce-overhead" and "--compile" in graphs
    assert "--pack-unimodal" in packed and "--compile" in packed
    assert gpu_ladder.config_of(graphs)["compile_mode"] == "reduce-overhead"
    assert gpu_ladder.config_of(packed)["pack_unimodal"]


def test_rows_that_no_longer_fit_the_budget_are_reported_skipped(tmp_path, capsys):
    assert gpu_ladder.main(["--out", str(tmp_path), "--budget", "10"]) == 0  # no row's minimum fits
    table = (tmp_path / "table.md").read_text()
    assert table.count("**skipped** (budget: ") == len(gpu_ladder.ROWS)
    assert "| large | 32 | 2 | auto | yes | **skipped**" in table and table in capsys.readouterr().out


def test_dry_run_rows_are_tiny_fp32_one_step_and_eager():
    for _, spec, _, _ in gpu_ladder.ROWS:
        args = gpu_ladder.row_args(spec, "/o", dry_run=True)
        assert "--compile" not in args and "--compile-mode" not in args and args[args.index("--preset") + 1] == "tiny"
        assert args[args.index("--dtype") + 1] == "fp32" and args[args.index("--steps") + 1] == "1"
        many = "," in spec[spec.index("--batch") + 1]
        assert args[args.index("--batch") + 1] == ("2,4" if many else "2")


def test_a_hanging_row_is_killed_at_its_timeout_and_a_crash_reported(tmp_path):
    with open(tmp_path / "log", "w") as log:
        start = time.monotonic()
        status, _ = gpu_ladder.run_row([sys.executable, "-c", "import time; time.sleep(60)"], 2, log)
        assert status == "timeout" and time.monotonic() - start < 30
        status, last = gpu_ladder.run_row([sys.executable, "-c", "raise ValueError('no such preset')"], 60, log)
    assert status == "error (exit 1)" and last == "ValueError: no such preset"


def test_markdown_rows_profile_and_sync_check():
    ok = {"preset": "large", "batch": 32, "zero": 3, "attention": "flex", "compile": True, "dtype": "bf16",
          "device": "NVIDIA H200", "torch": "2.11", "deepspeed": "0.19.8", "status": "ok", "s_step": 0.5,
          "samples_s": 64.0, "tflops": 300.0, "mfu": 300 / 989, "peak_mem_gib": 70.12, "first_step_s": 95.04,
          "profile": {"kind": "gpu", "step_ms": 500.0, "kernels": 4000, "host_syncs": 1, "host_sync_ms": 2.0,
                      "idle_gaps_ms": 50.0, "categories_ms": {"GEMM": 250.0, "attention": 100.0}},
          "sync_check": {"syncs": 2, "sites": [{"phase": "forward", "where": "vlmo_large/x.py:3 (f)", "count": 2}]}}
    oom = {"preset": "large", "batch": 64, "zero": 3, "attention": "flex", "compile": True, "status": "OOM",
           "error": "CUDA out of memory"}
    hung = {"preset": "base", "batch": "64", "zero": "3", "attention": "auto", "compile": True, "status": "timeout",
            "error": "last line"}
    assert table_row(ok) == "| large | 32 | 3 | flex | yes | 0.500 | 64.0 | 300.0 | 30.3% | 70.1 | 95.0 |"
    graphs = {**ok, "compile_mode": "reduce-overhead", "pack_unimodal": True, "status": "skipped"}
    assert table_row(graphs).startswith("| large | 32 | 3 | flex | yes (reduce-overhead), packed unimodal | **skipped")
    assert table_row({**ok, "compile_mode": "default"}) == table_row(ok)
    assert table_row(oom) == "| large | 64 | 3 | flex | yes | **OOM** |  |  |  |  |  |"
    assert table_row(hung) == "| base | 64 | 3 | auto | yes | **timeout** (last line) |  |  |  |  |  |"
    text = markdown([ok, oom, hung])
    assert text.startswith("## NVIDIA H200 — ") and "torch 2.11, deepspeed 0.19.8" in text
    assert "| GEMM | 250.0 | 50.0% |" in text and "| idle gaps (compute stream) | 50.0 | 10.0% |" in text
    assert "4000 kernel launches" in text and "**2**" in text and "- forward: 2 x `vlmo_large/x.py:3 (f)`" in text
