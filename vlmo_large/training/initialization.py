"""`--init`: start a stage from weights of an earlier one (safetensors file/dir or DeepSpeed checkpoint)."""
from __future__ import annotations

import os

from vlmo_large.formats.io import CheckpointError, LoadReport, load_into, load_torch_file
from vlmo_large.parallel import state
from vlmo_large.parallel.sharding import local_state_dict
from vlmo_large.training.checkpointing import find_resume_tag

WRAPPER_PREFIX = "model."  # PretrainingObjective holds VLMo as `.model`


def read_full_weights(path: str) -> dict:
    """Full (unsharded) VLMo tensors from a safetensors/torch file, an export directory
    (model.safetensors) or a DeepSpeed checkpoint directory (consolidated with zero_to_fp32)."""
    if os.path.isfile(path):
        return load_torch_file(path)
    export = os.path.join(path, "model.safetensors")
    if os.path.isfile(export):
        return load_torch_file(export)
    found = find_resume_tag(path)
    if found is None and os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            found = (path, f.read().strip())
    if found is None:
        raise CheckpointError(f"{path}: neither a weights file, an export dir (model.safetensors) nor a "
                              f"DeepSpeed checkpoint dir with a complete checkpoint")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(found[0], tag=found[1])
    return {k[len(WRAPPER_PREFIX):] if k.startswith(WRAPPER_PREFIX) else k: v for k, v in weights.items()}


def load_init_weights(model, path: str) -> LoadReport:
    """Copy matching tensors into `model` (this TP rank's slices); returns what matched."""
    full = read_full_weights(path)
    if state.tp_size() > 1:
        full = local_state_dict(model, full, state.tp_rank(), state.tp_size())
    return load_into(model, full, source=path)
