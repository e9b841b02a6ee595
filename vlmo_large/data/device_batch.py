"""Loader batches onto the training device: the copy, and the image normalisation done there.

What a batch carries says how to treat it: an "image" (or NLVR2's "image2") tensor of dtype uint8
holds raw pixels 0..255 (the loader with pixels="uint8", transforms.py) and is normalised here,
after the copy; a floating one is already normalised (pixels="float", random_batches.py) and is
only cast. Images are the only floating model inputs: every other tensor (VQA's soft targets and
any loss target) keeps its dtype, so a bf16 run's targets are not rounded (0.3 -> 0.30078).
Moving uint8 pixels copies a quarter of the bytes of float32 ones (and pins a quarter of the
host memory). On CUDA the copies are non_blocking: from pinned memory (the loader's
pin_memory) they overlap with the step; from pageable memory they are plain copies.
"""
from __future__ import annotations

import torch

from vlmo_large.data.transforms import MEAN, STD

_STATS: dict = {}  # device -> (mean, std) as [3, 1, 1] float32, made once per device


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _STATS:  # filled on the device: no blocking host copy (sync-free steps on CUDA)
        _STATS[device] = tuple(torch.stack([torch.full((1, 1), float(c), dtype=torch.float32, device=device)
                                            for c in values]) for values in (MEAN, STD))
    return _STATS[device]


def normalize_pixels(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> (x / 255 - mean) / std in float32 on the images' device, then `dtype`.
    The operations of torchvision's ToTensor + Normalize in their order, so on the CPU the result
    is bit-identical to the float loader's."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels takes uint8 pixels, got {images.dtype}")
    mean, std = _stats(images.device)
    return images.to(torch.float32).div(255).sub_(mean).div_(std).to(dtype)


def model_pixels(images: torch.Tensor, device, dtype: torch.dtype, non_blocking: bool = False) -> torch.Tensor:
    """A batch's "image" as the model takes it: on `device`, normalised, in `dtype`."""
    if images.dtype == torch.uint8:
        return normalize_pixels(images.to(device, non_blocking=non_blocking), dtype)
    return images.to(device, dtype, non_blocking=non_blocking)


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Tensors to `device` (images normalised there when uint8 and cast to `dtype`, the others in
    their own dtype); the rest (keys) unchanged."""
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    out = {}
    for name, value in batch.items():
        if not torch.is_tensor(value):
            out[name] = value
        elif name in ("image", "image2"):  # image2: NLVR2's second image
            out[name] = model_pixels(value, device, dtype, non_blocking)
        else:
            out[name] = value.to(device, non_blocking=non_blocking)
    return out


def pin_batch(batch: dict) -> dict:
    """The batch's tensors in page-locked memory (for asynchronous copies to the GPU)."""
    return {k: v.pin_memory() if torch.is_tensor(v) and not v.is_pinned() else v for k, v in batch.items()}
