"""Inputs and configs shared by the multi-rank worker (dist_worker.py) and the tests that check it."""
import math

import torch

from vlmo_large.training.run_config import build_dataclass, RunConfig

GLOBAL_BATCH = 8
ITM_TRIALS = 40
DIM = 16


def fresh_heads():
    from vlmo_large.model.heads import ContrastiveHeads

    torch.manual_seed(3)
    heads = ContrastiveHeads(DIM)
    with torch.no_grad():
        heads.logit_scale.fill_(math.log(5.0))
    return heads


def itc_inputs():
    gen = torch.Generator().manual_seed(4)
    return torch.randn(GLOBAL_BATCH, DIM, generator=gen), torch.randn(GLOBAL_BATCH, DIM, generator=gen)


def itm_inputs(rank: int, world: int):
    """Images and texts that carry their global index in their values, and random logits."""
    B = GLOBAL_BATCH // world
    index = torch.arange(B) + rank * B
    images = index.float()[:, None, None, None].expand(B, 3, 4, 4).clone()
    ids = (100 + index)[:, None].expand(B, 5).clone()
    mask = torch.ones_like(ids)
    gen = torch.Generator().manual_seed(rank)
    i2t, t2i = torch.randn(B, GLOBAL_BATCH, generator=gen), torch.randn(B, GLOBAL_BATCH, generator=gen)
    return {"image": images, "text_ids": ids, "text_mask": mask}, i2t, t2i


def ds_config(zero: int) -> dict:
    return {"zero_optimization": {"stage": zero, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": False}}


def run_config(out_dir: str, **overrides) -> RunConfig:
    data = {"preset": "tiny", "stage": "vl", "output_dir": out_dir, "seed": 1, "log_every": 1000,
            "data": {"source": "random"}, "batch": {"micro": 2},
            "schedule": {"steps": 4, "warmup": 2}, "optim": {"lr": 1e-3},
            "checkpoint": {"every": 0, "keep": 2}}
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return build_dataclass(RunConfig, data)


ONE_PROCESS_DS = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}


class Recorder:
    """A tracker that keeps what the trainer logs, for tests that read it back."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path):
        pass


def destroy_one_process_group():
    """Take down the in-memory process group the trainers of a module shared (DeepSpeed keeps
    the first group it saw, so it is cleared too)."""
    from deepspeed.utils import groups

    from vlmo_large.parallel import state

    state.destroy()
    groups._WORLD_GROUP = None
