"""DeepSpeed engine for one pretraining stage: optimiser groups, schedule, and this machine's quirks.

    prepare_deepspeed(rank)                      # before deepspeed.initialize, once per process
    engine = build_engine(objective, resolved, cfg)
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import re
import warnings

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from vlmo_large.parallel import state
from vlmo_large.training.optimization import WarmupDecay, run_param_groups
from vlmo_large.training.run_config import RunConfig
from vlmo_large.training.validation import ResolvedRun

_prepared = False


def prepare_deepspeed(rank: int) -> None:
    """Quiet DeepSpeed on every rank but 0, and on a CPU-only machine skip its shared-memory op
    (a JIT build, slow and needing a compiler, that only serves inference all-reduce; docs/CPU_STACK.md)."""
    global _prepared
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.\w+` is deprecated")
    os.environ.setdefault("LOCAL_RANK", "0")  # a plain one-process run has no launcher to set it
    if _prepared:
        return
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *args, **kwargs: None
    else:
        _plain_cuda_arch_list()
    _prepared = True


def _plain_cuda_arch_list() -> None:
    """DeepSpeed 0.19.8 cannot parse arch-specific names such as "9.0a" (set by some CUDA images)
    when it JIT-builds FusedAdam; the generic "9.0" builds the same kernels for this use."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-z]+", r"\1", arch)


def with_torch_fused_adamw(ds_config: dict) -> dict:
    """A copy of `ds_config` whose AdamW is torch's fused one (`torch_adam`), on every device.

    DeepSpeed's own FusedAdam is a JIT-built op: nvcc and a build on each compute node (and a CPU
    op built the same way). torch's fused AdamW is one multi-tensor kernel per step on a GPU and on
    a CPU quicker than torch's per-tensor loop over ZeRO's flat buffers (benchmarks/RESULTS.md, "CPU
    measurements cited by the code"); ZeRO's fp32 master partitions and its checkpoints are the
    same either way."""
    ds_config = copy.deepcopy(ds_config)
    ds_config["optimizer"]["params"].update(torch_adam=True, fused=True)
    return ds_config


def build_engine(objective: torch.nn.Module, resolved: ResolvedRun, cfg: RunConfig, heads=()):
    """deepspeed.initialize with AdamW groups over the trainable parameters (`heads`: the task's
    new modules, for optim.head_lr_mult) and warmup + decay."""
    import deepspeed

    prepare_deepspeed(dist.get_rank() if dist.is_initialized() else 0)
    groups = run_param_groups(objective, cfg.optim, resolved.model.depth, heads)
    schedule = WarmupDecay(cfg.schedule.warmup, cfg.schedule.steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio)
    # DeepSpeed's grad-norm and checkpoints must know about TP; its pipeline engine refuses an mpu
    mpu = state.DeepSpeedMPU() if cfg.parallel.tp > 1 and cfg.parallel.pp == 1 else None
    ds_config = with_torch_fused_adamw(resolved.ds_config)
    # No ZeRO-3 leaf modules (deepspeed.utils.set_z3_leaf_modules): a leaf reduces its gradients
    # in its module backward hook, once per call, and every MoME block and expert is called by
    # several passes of one step (image, text, VL branches, MLM and ITM pairs): the second call's
    # reduce hits DeepSpeed's duplicate-parameter assertion (tried with both; launchers/CLUSTER.md)
    engine, *_ = deepspeed.initialize(model=objective, model_parameters=groups, config=ds_config,
                                      lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: schedule(step)),
                                      mpu=mpu)  # a plain function: LambdaLR keeps it out of checkpoints
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one data-parallel rank: DeepSpeed's bucketed all-reduce would only flatten every gradient
        # and copy it back (benchmarks/RESULTS.md, "CPU measurements cited by the code")
        engine.enable_backward_allreduce = False
    return engine


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32
