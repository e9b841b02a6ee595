"""Which TP x PP x DP x ZeRO layouts this project runs, checked before any process group exists.

Supported: TP x ZeRO-0/1/2/3 data parallel; TP x PP x ZeRO-0/1 data parallel (DeepSpeed's pipeline
engine refuses ZeRO-2/3). Each unsupported combination raises a ValueError with one line that
says what to change.
"""
from __future__ import annotations

from vlmo_large.config import ModelConfig


def validate_layout(model_cfg: ModelConfig, tp: int, pp: int, dp: int, zero_stage: int,
                    world_size: int) -> None:
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={zero_stage} must be 0, 1, 2 or 3")
    if tp * pp * dp != world_size:
        raise ValueError(f"world size {world_size} != tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp}: "
                         f"choose sizes whose product is the number of processes")
    if pp > 1 and zero_stage > 1:
        raise ValueError("DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only: "
                         "set zero_optimization.stage to 1")
    for key, value in (("num_heads", model_cfg.num_heads), ("ffn_dim", model_cfg.ffn_dim),
                       ("vocab_size", model_cfg.vocab_size)):
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {key}={value} of "
                             f"'{model_cfg.name}': pick a tp that divides heads, FFN and vocabulary")
    if pp > model_cfg.depth:
        raise ValueError(f"pipeline parallel size {pp} exceeds the depth {model_cfg.depth} of "
                         f"'{model_cfg.name}': every stage needs at least one block")
