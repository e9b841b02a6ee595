"""The one place where megatron-core's CUDA assumptions are worked around on a CPU-only machine.

Never active when a GPU is present. megatron-core allocates gather buffers on
`torch.cuda.current_device()` inside `tensor_parallel`; on the CPU those modules get a
`current_device` that names the CPU, and nothing else in torch is touched.
"""
from __future__ import annotations

import types

import torch

_installed = False


def install_if_cpu() -> bool:
    global _installed
    if torch.cuda.is_available() or _installed:
        return _installed
    from megatron.core.tensor_parallel import layers, mappings

    cuda_on_cpu = types.SimpleNamespace(current_device=lambda: torch.device("cpu"))

    class _TorchWithCpuCuda(types.ModuleType):
        def __getattr__(self, name):
            return cuda_on_cpu if name == "cuda" else getattr(torch, name)

    for module in (layers, mappings):
        module.torch = _TorchWithCpuCuda("torch")
    _installed = True
    return True
