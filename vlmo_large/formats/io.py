"""Loading weights safely (never executing code from a file) and reporting what matched."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmo_large.errors import UserError

WRAPPERS = ("state_dict", "module", "model")


class CheckpointError(UserError):
    """A checkpoint file that cannot be used; the message names the file (and tensor)."""


def load_torch_file(path: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True, then unwrap state_dict / module / model and `module.`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as exc:  # safetensors reports corrupt headers in its own words
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load {path} as a weights-only torch file "
                              f"(truncated, corrupt, or holding code objects): {exc}") from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, path: str = "<memory>") -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        key = next((k for k in WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors found (looked under {WRAPPERS} and the top)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # in the model, not in the file: stay as initialised
    unexpected: list[str] = field(default_factory=list)   # in the file, not used
    converted: list[str] = field(default_factory=list)    # resized or resampled on the way

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, names in (("new (not in the file)", self.missing), ("unused from the file", self.unexpected),
                             ("converted", self.converted)):
            if names:
                lines.append(f"{title}: {len(names)}: " + ", ".join(names))
        return "\n".join(lines)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "<memory>") -> LoadReport:
    """Copy matching tensors into `model`; a shape mismatch is an error naming the tensor."""
    own = model.state_dict()
    report = LoadReport()
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
            continue
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, the model "
                                  f"expects {tuple(own[name].shape)} (a checkpoint of another preset?)")
        report.loaded.append(name)
    report.missing = [n for n in own if n not in state]
    # another pipeline stage's tensors stay on meta here (parallel/stage_build.py): that stage loads them
    model.load_state_dict({n: state[n] for n in report.loaded if not own[n].is_meta}, strict=False)
    return report
