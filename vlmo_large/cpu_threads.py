"""CPU threads per training process: the cores this process may use, shared by the ranks of its node.

torch starts one intra-op thread per core in every process. Several ranks on one host (or one
loader workers next to a rank) then run more spinning OpenMP threads than there are cores, and
each step waits on threads that are descheduled: the same run, with identical losses, is an order
of magnitude slower (benchmarks/RESULTS.md, "CPU measurements cited by the code").

    n, why = choose_threads(os.environ, requested=args.threads)
    apply_threads(n)

Precedence: an explicit request (the launcher's --threads), then OMP_NUM_THREADS (the user's, or
torchrun's own choice for several ranks), then usable cores / local ranks, at least 1. The
host's load is deliberately not counted: its 1-minute average still holds the work that ran just
before (data generation, a previous stage) and halved an idle machine's throughput in the demo;
on a machine shared with other jobs set OMP_NUM_THREADS or --threads. Data-loader worker
processes run one thread each: torch's worker loop sets that itself.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from vlmo_large.errors import UserError


def usable_cores() -> int:
    """Cores this process may run on (a Slurm or taskset CPU set), not every core of the host."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def local_ranks(env: Mapping[str, str]) -> int:
    """Processes of this run on this host: torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    return 1


def choose_threads(env: Mapping[str, str], requested: Optional[int] = None,
                   cores: Optional[int] = None) -> tuple[int, str]:
    """(torch threads for this process, one phrase saying where the number came from). `cores`
    defaults to this process's usable cores."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be at least 1, got {requested}")
        return requested, "--threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise UserError(f"OMP_NUM_THREADS must be a positive integer, got {omp!r}")
        return int(omp), "OMP_NUM_THREADS"
    cores = usable_cores() if cores is None else cores
    ranks = local_ranks(env)
    return max(1, cores // ranks), f"{cores} cores / {ranks} local rank{'s' if ranks > 1 else ''}"


def apply_threads(n: int) -> None:
    """torch's intra-op threads in this process; OMP_NUM_THREADS for the processes it starts."""
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
