"""Process groups: megatron-core's `parallel_state` is the one source of truth for TP/PP/DP ranks.

`ensure_initialized` works in every way the code is started: under `deepspeed`/`torchrun` (the
launcher's environment), and as a plain single process, where it creates a one-rank gloo group in
memory so that megatron-core's layers run unchanged at TP=1.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vlmo_large.parallel.layout import data_parallel_size


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from the launcher's environment, or as a single process."""
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(_backend(), timeout=timeout)
    else:
        dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def ensure_initialized(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Make sure torch.distributed and megatron-core's model-parallel groups exist.

    If groups already exist with another layout that is an error, not a silent reuse.
    """
    if not dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        destroy()  # megatron's groups of a world someone took down: stale, never reused
    init_distributed()
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tensor_parallel, pipeline_parallel):
            raise RuntimeError(f"model-parallel groups already initialised as TP={have[0]} PP={have[1]}, "
                               f"asked for TP={tensor_parallel} PP={pipeline_parallel}")
        return
    data_parallel_size(dist.get_world_size(), tensor_parallel, pipeline_parallel)  # the world-size rule
    from vlmo_large.parallel import cpu_shim
    cpu_shim.install_if_cpu()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel,
                                             create_gloo_process_groups=False)


def tp_group():
    ensure_initialized_default()
    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    ensure_initialized_default()
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    ensure_initialized_default()
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_group():
    ensure_initialized_default()
    return parallel_state.get_data_parallel_group()


def dp_size() -> int:
    ensure_initialized_default()
    return parallel_state.get_data_parallel_world_size()


def dp_rank() -> int:
    ensure_initialized_default()
    return parallel_state.get_data_parallel_rank()


def ensure_initialized_default() -> None:
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        ensure_initialized(1, 1)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:  # DeepSpeed caches a clone of the world group and the mpu: stale in the next run
        groups._WORLD_GROUP, groups.mpu = None, None


class DeepSpeedMPU:
    """megatron-core's parallel_state in the shape DeepSpeed's `mpu` argument expects.

    DeepSpeed still calls get_model_parallel_{rank,world_size,group}, which megatron-core removed;
    model parallel here means the tensor-parallel group (pipeline is DeepSpeed's own engine).
    """

    def __getattr__(self, name):
        return getattr(parallel_state, name)

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()
