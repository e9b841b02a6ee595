"""Plain VLMo weights <-> the pipeline layers of one stage, at any TP size; per-stage trainability.

A pipeline layer names its parameters locally ("block.attn.qkv.weight" in block layer 2) and maps
each to its VLMo name ("backbone.blocks.2.attn.qkv.weight"). Block layer i owns columns
[i*H, (i+1)*H) of the merged relative-position table (H = all heads; columns are layer-major), so
the table is cut per layer on load and concatenated back on gather. TP slicing reuses the
placement attributes of sharding.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from vlmo_large.parallel import state
from vlmo_large.parallel.sharding import gather_full_state_dict, local_state_dict

TABLE = "backbone.rel_pos.table"

# What each pretraining stage updates (VLMO_SPEC section 5); everything else is frozen or, for
# parts a stage never runs (stage 1's text side, stage 3's MIM head), not even built.
_IMAGE_STAGE = ("backbone.patch_embed.", "backbone.modality_embed.", "backbone.rel_pos.", "backbone.norm.",
                "backbone.blocks.", "mim_head.")
_TEXT_STAGE = ("backbone.text_embeddings.", "backbone.modality_embed.", "backbone.rel_pos.", "backbone.norm.",
               "mlm_head.")


def trainable(plain_name: str, stage: int) -> bool:
    """Whether pretraining `stage` updates this VLMo parameter."""
    if stage == 1:  # image-only MIM: attention and the vision expert, not the text/VL experts
        return (plain_name.startswith(_IMAGE_STAGE) and ".experts.text." not in plain_name
                and ".experts.vl." not in plain_name)
    if stage == 2:  # text-only MLM: the language side only
        return plain_name.startswith(_TEXT_STAGE) or ".experts.text." in plain_name
    return not plain_name.startswith("mim_head.")


def local_layers(pipe) -> list:
    """The pipeline layers built on this stage, in order."""
    return list(pipe.forward_funcs)


def _plain_key(layer, local_name: str) -> str:
    plain = layer.plain_name(local_name)
    return f"{TABLE}@{layer.index}" if plain == TABLE else plain


def freeze_for_stage(pipe, stage: int) -> None:
    for layer in local_layers(pipe):
        for name, param in layer.named_parameters():
            param.requires_grad_(trainable(layer.plain_name(name), stage))


def load_plain_state_dict(pipe, full: dict[str, torch.Tensor]) -> None:
    """Load this stage's layers from a plain VLMo state dict (full tensors)."""
    rank, world = state.tp_rank(), state.tp_size()
    for layer in local_layers(pipe):
        plain = {}
        for name in layer.state_dict():
            key = _plain_key(layer, name)
            if key.startswith(TABLE + "@"):
                heads = layer.cfg.num_heads
                plain[name] = full[TABLE][:, layer.index * heads:(layer.index + 1) * heads]
            else:
                plain[name] = full[key].reshape(layer.state_dict()[name].shape)  # [] -> [1] scales
        layer.load_state_dict(local_state_dict(layer, plain, rank, world))


def gather_plain_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Plain VLMo tensors of every stage's layers, on every rank (for tests and small exports:
    it moves the whole model through all_gather_object; DeepSpeed's checkpoints are per layer)."""
    part = {}
    for layer in local_layers(pipe):
        for name, tensor in gather_full_state_dict(layer, state.tp_group()).items():
            scalar = name in getattr(layer, "scalar_params", ())
            part[_plain_key(layer, name)] = tensor.reshape(()) if scalar else tensor
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, part, group=parallel_state.get_pipeline_model_parallel_group())
    merged = {k: v for p in parts for k, v in p.items()}
    slices = sorted((int(k.split("@")[1]), k) for k in merged if k.startswith(TABLE + "@"))
    if slices:
        merged[TABLE] = torch.cat([merged.pop(k) for _, k in slices], dim=1)
    return merged
