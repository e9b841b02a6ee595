"""What a model config implies for checkpoints: tensor names, full shapes and TP placement.

A model built on the meta device at TP=1 allocates nothing and carries megatron's attributes, so
`model.tensor_parallel.placement` (the one definition of the TP layout) answers for every parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmo_large.config import ModelConfig, get_preset
from vlmo_large.formats.io import CheckpointError
from vlmo_large.model.tensor_parallel import placement


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    place: tuple[int, int] | None  # (partition dim, stride) when TP-split, None when replicated


def model_layout(cfg: ModelConfig, shapes: dict[str, tuple] | None = None) -> dict[str, TensorInfo]:
    """Every state-dict tensor of VLMo(cfg), in state-dict order. shapes: {name: shape} of a
    checkpoint's tensors: the fine-tuning heads among them (formats/reference.py finetuned_heads)
    are part of the layout too."""
    from vlmo_large.formats.reference import finetuned_heads
    from vlmo_large.model import build_model

    model = build_model(cfg, device="meta", heads=finetuned_heads(shapes or {}, cfg))
    params = dict(model.named_parameters())
    return {name: TensorInfo(tuple(t.shape), placement(params[name]) if name in params else None)
            for name, t in model.state_dict().items()}


def local_shape(info: TensorInfo, tp: int) -> tuple:
    if info.place is None or tp == 1:
        return info.shape
    dim = info.place[0]
    return tuple(s // tp if d == dim else s for d, s in enumerate(info.shape))


def resolve_config(preset: str | None = None, config_path: str | None = None,
                   found: dict | None = None, source: str = "checkpoint") -> ModelConfig:
    """An explicit --config / --preset wins; otherwise the config stored with the checkpoint."""
    from vlmo_large.checkpoint.plain import config_from_dict

    if config_path:
        import json
        try:
            with open(config_path) as f:
                return config_from_dict(json.load(f), config_path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read model config {config_path}: {exc}") from exc
    if preset:
        return get_preset(preset)
    if found is not None:
        return config_from_dict(found, source)
    raise CheckpointError(f"{source}: no model config stored with the checkpoint; pass --preset or --config")


def name_prefix(names: list[str], known: set[str], source: str) -> str:
    """The prefix (e.g. `module.model.`) that turns the first checkpoint name it can into a model name."""
    prefix = None
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts)):
            if ".".join(parts[cut:]) in known:
                prefix = ".".join(parts[:cut]) + ("." if cut else "")
                break
        if prefix is not None:
            break
    if prefix is None:
        raise CheckpointError(f"{source}: no tensor name matches the model (first: '{names[0] if names else '-'}'); "
                              "a checkpoint of another model?")
    return prefix


def strip_prefix(names: list[str], known: set[str], source: str) -> dict[str, str]:
    """Map checkpoint names (e.g. `module.model.backbone...`) to model names by one common prefix."""
    prefix = name_prefix(names, known, source)
    mapping = {}
    for name in names:
        short = name[len(prefix):] if name.startswith(prefix) else None
        if short not in known:
            raise CheckpointError(f"{source}: tensor '{name}' is not part of the model config "
                                  "(a checkpoint of another preset?)")
        mapping[name] = short
    return mapping


def check_shape(name: str, got, want, source: str) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(got)}, the model config expects "
                              f"{tuple(want)} (a checkpoint of another preset?)")


def dtype_of(text: str | None) -> torch.dtype | None:
    table = {None: None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if text not in table:
        raise ValueError(f"unknown dtype '{text}' (fp32, bf16, fp16)")
    return table[text]
