"""One step that decides how the model executes: `parallelize(model, plan)`.

The forward code of the model decides none of this per call; this step applies, in this order
(torchtitan's order: each step wraps what the previous one produced):

1. Tensor parallelism. Applied when the model is built: the megatron layers (tensor_parallel.py)
   split their weights by the TP group passed to build_model at construction. Here it is only
   checked: every attention holds num_heads / tp heads and every TP layer uses that group's size.
2. Activation checkpointing, per block (every `checkpoint_every`-th one): the block's forward is
   replaced in place by a recomputing one (MoMEBlock.set_checkpointing).
3. The attention backend of every block (attention.py: auto / sdpa / flex / explicit).
4. torch.compile per block (regional), in place with `Module.compile`: parameter names do not
   change (DeepSpeed checkpoints and the converters rely on them); checkpointing, applied before,
   is traced into the compiled block. Embeddings, heads and losses stay eager.

The pipeline (training/pipeline_module.py) runs these same blocks, as this step left them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlmo_large.config import ModelConfig
from vlmo_large.model.block import apply_checkpointing
from vlmo_large.model.tensor_parallel import ColumnLinear, RowLinear

# A stage-3 step calls each block with up to ~8 distinct (route, sequence length, mask, queries)
# signatures, and blocks below and above vl_start differ in structure; all blocks share one code
# object, whose cache must hold every variant (tests/model/test_compile.py counts them).
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class ExecutionPlan:
    attention: str = "auto"
    checkpoint_every: int = 0
    compile: bool = False
    compile_backend: str = "inductor"  # tests use "aot_eager": the same graphs and autograd, no codegen
    compile_mode: str = "default"  # config.COMPILE_MODES ("reduce-overhead": CUDA graphs per block)


def plan_from_config(cfg: ModelConfig) -> ExecutionPlan:
    return ExecutionPlan(attention=cfg.attention, checkpoint_every=cfg.checkpoint_every, compile=cfg.compile,
                         compile_mode=cfg.compile_mode)


def parallelize(model: nn.Module, plan: ExecutionPlan) -> nn.Module:
    """Apply `plan` to a VLMo (or a bare MoMEBackbone) in place; returns the model."""
    backbone = getattr(model, "backbone", model)
    check_tensor_parallel(backbone)
    apply_checkpointing(backbone.blocks, plan.checkpoint_every)
    for block in backbone.blocks:
        block.attn.backend = plan.attention
    if plan.compile:
        compile_blocks(backbone.blocks, plan.compile_backend, plan.compile_mode)
    return model


def check_tensor_parallel(backbone: nn.Module) -> None:
    tp = backbone.tp_size  # the group it was built with (parallel/state is not consulted: no side effect)
    heads = backbone.cfg.num_heads
    for index, block in enumerate(backbone.blocks):
        if block.attn.local_heads * tp != heads:
            raise ValueError(f"block {index} holds {block.attn.local_heads} attention heads; with tensor parallel "
                             f"size {tp} it needs {heads // tp}: build the model with the run's tp_group")
    for name, module in backbone.named_modules():
        if isinstance(module, (ColumnLinear, RowLinear)):
            size = 1 if module.tp_group is None else module.tp_group.size()
            if size != tp:
                raise ValueError(f"{name} was built for tensor parallel size {size}, the run uses {tp}")


def compile_blocks(blocks, backend: str = "inductor", mode: str = "default") -> None:
    """torch.compile each block in place, whole-graph (a graph break raises). A mode other than
    "default" is inductor's (torch rejects a mode with another backend)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.attn.compiled = True
        if mode == "default":
            block.compile(fullgraph=True, backend=backend)
        else:
            block.compile(fullgraph=True, backend=backend, mode=mode)
