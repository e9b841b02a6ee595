"""Where one profiled training step spends its time, from a torch.profiler chrome trace.

    breakdown = summarize_trace(json.load(open("trace.json")))
    print(format_breakdown(breakdown))

Categories (first matching rule wins; `category(name)` holds the rules):
    communication   nccl / gloo / c10d collectives (all_reduce, all_gather, reduce_scatter, ...)
    host sync       cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize, aten::item,
                    aten::_local_scalar_dense (a GPU value read by the host waits for the GPU)
    optimizer       Adam kernels and ops (torch's fused AdamW, DeepSpeed's multi-tensor Adam)
    attention       sdpa / flash / fused multi-head attention / flex attention / softmax
    GEMM            mm, addmm, bmm, linear, matmul and the CUDA GEMM kernels (cuBLAS, CUTLASS, nvjet)
    memory-bound    everything else: elementwise, norms, reductions, copies, memcpy / memset

GPU trace (kernels present): kernel time per category (the GPU's busy time), the idle gaps between
kernels on the compute stream (the stream with the most kernel time; a gap is time where that
stream ran nothing between the first and the last kernel of the step), the kernel count (launches),
and the host's time in synchronising CUDA calls.
CPU trace: self time of every op or annotated range (its duration minus that of its children on
the same thread), per category; time in no op at all (Python between ops) is "outside ops" so the
categories sum to the step's wall time. Ops dispatched per step: every aten op, and the aten ops
that call no other aten op (the ones that do the work: the CPU's stand-in for kernel launches).
"""
from __future__ import annotations

import re
from collections import defaultdict

CATEGORIES = ("GEMM", "attention", "memory-bound", "communication", "optimizer", "host sync")

_RULES = (
    ("communication", re.compile(r"nccl|gloo|c10d|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all"
                                 r"|record_param_comms", re.I)),
    ("host sync", re.compile(r"cuda(Stream|Device|Event)Synchronize|^aten::item$|_local_scalar_dense", re.I)),
    ("optimizer", re.compile(r"adam", re.I)),
    ("attention", re.compile(r"scaled_dot_product|flash|fmha|flex|attention|(?<!log_)softmax", re.I)),
    ("GEMM", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_addmm_activation)$|gemm|cutlass"
                        r"|cublas|nvjet|xmma|wgmma|triton_tem_fused_.*(mm|bmm)", re.I)),
)

SYNC_CALLS = re.compile(r"^cuda(StreamSynchronize|DeviceSynchronize|EventSynchronize)$|^cudaMemcpy$")


def category(name: str) -> str:
    for label, pattern in _RULES:
        if pattern.search(name):
            return label
    return "memory-bound"


def _complete_events(trace: dict) -> list[dict]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _self_times(events: list[dict]) -> list[tuple[dict, float, int]]:
    """(event, self microseconds, number of direct children) for nested events of one thread."""
    out, stack = [], []  # stack of [event, end, children time, children count]
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and e["ts"] >= stack[-1][1]:
            top = stack.pop()
            out.append((top[0], top[0]["dur"] - top[2], top[3]))
        if stack:
            stack[-1][2] += e["dur"]
            stack[-1][3] += 1
        stack.append([e, e["ts"] + e["dur"], 0.0, 0])
    out += [(top[0], top[0]["dur"] - top[2], top[3]) for top in stack]
    return out


def _step_window(events: list[dict]) -> tuple[float, float] | None:
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    if not steps:
        return None
    return min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)


def summarize_trace(trace) -> dict:
    """The breakdown of a chrome trace (dict or its "traceEvents" list); times in milliseconds."""
    events = _complete_events(trace)
    window = _step_window(events)
    if window:
        events = [e for e in events if e["ts"] >= window[0] and e["ts"] < window[1]]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    result = {"kind": "gpu" if kernels else "cpu"}
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
            and not e["name"].startswith("ProfilerStep#")]
    if window:
        result["step_ms"] = (window[1] - window[0]) / 1e3
    elif host:
        result["step_ms"] = (max(e["ts"] + e["dur"] for e in host) - min(e["ts"] for e in host)) / 1e3
    else:
        result["step_ms"] = 0.0
    if kernels:
        result.update(_gpu_summary(kernels, host))
    else:
        result.update(_cpu_summary(host, result["step_ms"]))
    return result


def _gpu_summary(kernels: list[dict], host: list[dict]) -> dict:
    per_stream = defaultdict(float)
    for k in kernels:
        per_stream[k.get("args", {}).get("stream", 0)] += k["dur"]
    compute = max(per_stream, key=per_stream.get)
    times = defaultdict(float)
    for k in kernels:
        times[category(k["name"])] += k["dur"] / 1e3
    on_stream = sorted((k for k in kernels if k.get("args", {}).get("stream", 0) == compute), key=lambda k: k["ts"])
    gaps, end = 0.0, on_stream[0]["ts"]
    for k in on_stream:
        gaps += max(0.0, k["ts"] - end)
        end = max(end, k["ts"] + k["dur"])
    syncs = [e for e in host if e.get("cat") == "cuda_runtime" and SYNC_CALLS.search(e["name"])]
    return {"categories_ms": {c: times.get(c, 0.0) for c in CATEGORIES},
            "kernel_ms": sum(k["dur"] for k in kernels) / 1e3,
            "kernels": sum(1 for k in kernels if k.get("cat") == "kernel"),
            "compute_stream": compute, "streams": len(per_stream),
            "stream_span_ms": (end - on_stream[0]["ts"]) / 1e3, "idle_gaps_ms": gaps / 1e3,
            "host_syncs": len(syncs), "host_sync_ms": sum(e["dur"] for e in syncs) / 1e3}


def _cpu_summary(host: list[dict], step_ms: float) -> dict:
    times, ops, leaf_ops = defaultdict(float), 0, 0
    by_thread = defaultdict(list)
    for e in host:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for thread_events in by_thread.values():
        aten_children = _aten_children(thread_events)
        for e, self_us, _ in _self_times(thread_events):
            times[category(e["name"])] += self_us / 1e3
            if e["name"].startswith("aten::"):
                ops += 1
                leaf_ops += aten_children.get(id(e), 0) == 0
    in_ops = sum(times.values())
    return {"categories_ms": {c: times.get(c, 0.0) for c in CATEGORIES}, "in_ops_ms": in_ops,
            "outside_ops_ms": max(0.0, step_ms - in_ops), "aten_ops": ops, "aten_leaf_ops": leaf_ops}


def _aten_children(events: list[dict]) -> dict:
    """id(event) -> number of aten ops nested anywhere below it (same thread)."""
    counts, stack = {}, []
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
            stack.pop()
        if e["name"].startswith("aten::"):
            for parent in stack:
                counts[id(parent)] = counts.get(id(parent), 0) + 1
        stack.append(e)
    return counts


def format_breakdown(b: dict) -> str:
    step = b["step_ms"] or 1e-9
    lines = []
    if b["kind"] == "gpu":
        lines.append(f"profiled step {b['step_ms']:.1f} ms wall; GPU kernels {b['kernel_ms']:.1f} ms in "
                     f"{b['kernels']} launches on {b['streams']} stream(s)")
        rows = list(b["categories_ms"].items()) + [("idle gaps (compute stream)", b["idle_gaps_ms"])]
        for name, ms in rows:
            lines.append(f"  {name:28s} {ms:9.1f} ms  {100 * ms / step:5.1f}% of the step")
        lines.append(f"  host syncs: {b['host_syncs']} calls, {b['host_sync_ms']:.1f} ms of host time")
    else:
        lines.append(f"profiled step {b['step_ms']:.1f} ms wall on the CPU; {b['aten_ops']} aten ops dispatched, "
                     f"{b['aten_leaf_ops']} doing the work (no aten op below them: the kernel-launch proxy)")
        rows = list(b["categories_ms"].items()) + [("outside ops (Python)", b["outside_ops_ms"])]
        for name, ms in rows:
            lines.append(f"  {name:28s} {ms:9.1f} ms  {100 * ms / step:5.1f}% of the step (self time)")
    return "\n".join(lines)
