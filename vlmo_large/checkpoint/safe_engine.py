"""DeepSpeed's checkpoint engine with a load that runs no code from the files it reads.

DeepSpeed's TorchCheckpointEngine loads with `torch.load(weights_only=False)`: a model-states or
optimizer file holding a pickled `__reduce__` payload runs it on resume. `install(engine)` wraps
the engine's checkpoint engine so that every file DeepSpeed reads (model states, ZeRO optimizer
partitions, pipeline layer files) goes through `torch.load(weights_only=True)`, with only the
few DeepSpeed types its own checkpoints pickle allow-listed (found by saving real checkpoints at
ZeRO-0/1/2/3, bf16 and PP: loss scaler, ZeRO stage enum, fragment address). Saving is unchanged.
"""
from __future__ import annotations

import pickle
import re

import torch

from vlmo_large.formats.io import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holding objects other than tensors and plain data (possibly code)."""


def deepspeed_types() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """torch.load(weights_only=True) with DeepSpeed's types allowed; errors name the file."""
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met a global it does not allow
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        raise UnsafeCheckpointError(f"{path} holds objects other than tensors and plain data (possibly code), "
                                    f"refused (unpickling it would call {found.group(1) if found else 'a disallowed global'})") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot load {path} (truncated or corrupt?): {str(exc).splitlines()[0]}") from exc


class WeightsOnlyLoad:
    """Delegates everything to DeepSpeed's checkpoint engine but `load`."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)


def install(engine) -> None:
    """Make every later `engine.load_checkpoint` read weights-only (idempotent)."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoad):
        engine.checkpoint_engine = WeightsOnlyLoad(engine.checkpoint_engine)
