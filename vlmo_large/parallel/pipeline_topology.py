"""One rank layout for megatron-core and DeepSpeed's pipeline engine.

megatron's default order "tp-cp-ep-dp-pp" puts tensor parallel fastest and pipeline slowest:
rank = tp + TP * (dp + DP * pp). DeepSpeed's `PipeModelDataParallelTopology` has axes
[pipe, data, model] in row-major order, which is the same formula. So megatron's
`parallel_state` (used by the model's TP layers, the ITC gather over data parallel) and
DeepSpeed's `PipelineParallelGrid` (p2p sends, ZeRO-1's data-parallel partition, grad-norm group)
describe the same groups; `check_agreement` proves it at start-up instead of trusting it.
"""
from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from vlmo_large.parallel import state


def pipeline_topology(tensor_parallel: int, pipeline_parallel: int) -> PipeModelDataParallelTopology:
    """Initialise megatron's groups for TP x PP and return the DeepSpeed topology that matches them."""
    state.ensure_initialized(tensor_parallel, pipeline_parallel)
    world = dist.get_world_size()
    data_parallel = world // (tensor_parallel * pipeline_parallel)
    topo = PipeModelDataParallelTopology(num_pp=pipeline_parallel, num_mp=tensor_parallel,
                                         num_dp=data_parallel)
    check_agreement(topo)
    return topo


def _ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def check_agreement(topo) -> None:
    """Raise if megatron's TP/DP/PP groups of this rank differ from the DeepSpeed topology's."""
    coord = topo.get_coord(dist.get_rank())
    pairs = {
        "tensor": (_ranks(parallel_state.get_tensor_model_parallel_group()),
                   sorted(topo.filter_match(pipe=coord.pipe, data=coord.data))),
        "data": (_ranks(parallel_state.get_data_parallel_group()),
                 sorted(topo.filter_match(pipe=coord.pipe, model=coord.model))),
        "pipeline": (_ranks(parallel_state.get_pipeline_model_parallel_group()),
                     sorted(topo.filter_match(data=coord.data, model=coord.model))),
    }
    for name, (megatron_ranks, deepspeed_ranks) in pairs.items():
        if megatron_ranks != deepspeed_ranks:
            raise RuntimeError(f"{name}-parallel group of rank {dist.get_rank()} differs: megatron "
                               f"{megatron_ranks}, DeepSpeed {deepspeed_ranks}")
