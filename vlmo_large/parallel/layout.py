"""Which TP x PP x DP x ZeRO layouts this project runs, checked before any process group exists.

Supported: TP x ZeRO-0/1/2/3 data parallel; TP x PP x ZeRO-0/1 data parallel (DeepSpeed's pipeline
engine refuses ZeRO-2/3). Each rule is one function here (the tensor-parallel rule is
config.check_tensor_parallel, a model-config fact), used by every caller: the run validation, the
process groups, the pipeline engine, the memory estimator and the checkpoint splitter. Each
unsupported combination raises a ValueError with one line that says what to change.
"""
from __future__ import annotations

import re

from vlmo_large.config import ModelConfig, check_tensor_parallel

_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.")
# what the first stage runs besides its blocks: the embeddings (the MIM mask token is one input of them)
_FIRST_STAGE = ("backbone.text_embeddings.", "backbone.patch_embed.", "backbone.modality_embed.",
                "mim_head.mask_token")


def stage_blocks(depth: int, pp: int) -> list[range]:
    """The one stage-split rule, of the pipeline, the checkpoint splitter and the memory estimator:
    stage s runs blocks [s * depth // pp, (s + 1) * depth // pp) (as even as the depth allows, none
    empty); the embeddings run on the first stage, the final norm and the heads on the last."""
    if not 1 <= pp <= depth:
        raise ValueError(f"cannot split {depth} blocks into {pp} pipeline stages")
    return [range(s * depth // pp, (s + 1) * depth // pp) for s in range(pp)]


def stage_of(name: str, depth: int, pp: int) -> int:
    """The stage that holds VLMo tensor `name` under stage_blocks."""
    if (m := _BLOCK.match(name)):
        block = int(m.group(1))
        return next(stage for stage, blocks in enumerate(stage_blocks(depth, pp)) if block in blocks)
    return 0 if name.startswith(_FIRST_STAGE) else pp - 1


def pipeline_parts(depth: int, pp: int) -> list[int]:
    """stage_blocks as DeepSpeed's layer boundaries over [embeddings, block 0 .. depth - 1, head]."""
    blocks = stage_blocks(depth, pp)
    return [0] + [1 + b.stop for b in blocks[:-1]] + [depth + 2]


def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """The world-size rule: the processes form whole TP x PP model replicas; returns their number."""
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by parallel.tp ({tp}) * parallel.pp ({pp})")
    return world_size // (tp * pp)


def check_pipeline_zero(pp: int, zero_stage: int) -> None:
    """The pipeline/ZeRO rule: DeepSpeed's PipelineEngine asserts ZeRO stage < 2 at initialisation."""
    if pp > 1 and zero_stage > 1:
        raise ValueError("DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only: "
                         "set zero_optimization.stage to 1")


def check_pipeline_depth(model_cfg: ModelConfig, pp: int) -> None:
    """Every pipeline stage holds at least one block."""
    if pp > model_cfg.depth:
        raise ValueError(f"pipeline parallel size {pp} exceeds the depth {model_cfg.depth} of "
                         f"'{model_cfg.name}': every stage needs at least one block")


def validate_layout(model_cfg: ModelConfig, tp: int, pp: int, dp: int, zero_stage: int,
                    world_size: int) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={zero_stage} must be 0, 1, 2 or 3")
    if data_parallel_size(world_size, tp, pp) != dp:
        raise ValueError(f"world size {world_size} != tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp}: "
                         f"choose sizes whose product is the number of processes")
    check_pipeline_zero(pp, zero_stage)
    check_tensor_parallel(model_cfg, tp)
    check_pipeline_depth(model_cfg, pp)
