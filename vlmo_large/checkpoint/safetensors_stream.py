"""Write safetensors files one tensor at a time.

The safetensors header lists every tensor's dtype, shape and byte range, so when the shapes are
known in advance the header can be written first and the tensors streamed after it: memory stays
at one tensor however large the file. Files are readable by `safetensors.safe_open`/`load_file`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable

import torch

DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}


def nbytes(shape, dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KB' or a byte count (decimal units, as the HF convention)."""
    if isinstance(text, int):
        return text
    units = {"TB": 10 ** 12, "GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"cannot read size '{text}' (examples: 5GB, 500MB, 1000000)")


def plan_shards(entries: list[tuple[str, tuple, torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Group entry indices into files of at most `max_bytes` (a bigger single tensor gets its own)."""
    shards, current, size = [], [], 0
    for index, (_, shape, dtype) in enumerate(entries):
        need = nbytes(shape, dtype)
        if current and size + need > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(index)
        size += need
    if current or not shards:
        shards.append(current)
    return shards


def write_streamed(path: str, entries: list[tuple[str, tuple, torch.dtype]],
                   fetch: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                   on_tensor: Callable[[str], None] | None = None) -> None:
    """Write `entries` (name, shape, dtype) to `path`, calling `fetch(name)` for each tensor in turn.

    The file is written under a temporary name and renamed at the end, so a crash never leaves a
    file that looks complete.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            tensor = fetch(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"planned {tuple(shape)} {dtype}")
            f.write(_raw_bytes(tensor))
            if on_tensor is not None:
                on_tensor(name)
    os.replace(tmp, path)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())

