"""VLMo: the MoME backbone plus the pooler, every pretraining head and a fine-tuning task's heads."""
from __future__ import annotations

import torch
from torch import nn

from vlmo_large.config import ModelConfig, get_preset
from vlmo_large.model.backbone import MoMEBackbone
from vlmo_large.model.heads import ContrastiveHeads, MIMHead, MLMHead, Pooler
from vlmo_large.model.initialization import draw_seed, materialize


class VLMo(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None, heads: dict[str, nn.Module] | None = None):
        """heads: a fine-tuning task's modules by attribute name (Task.heads), initialised as the others."""
        super().__init__()
        self.cfg = cfg
        self.backbone = MoMEBackbone(cfg, tp_group)
        self.tp_size = self.backbone.tp_size
        dim = cfg.embed_dim
        self.itc = ContrastiveHeads(dim)      # on the final image / text CLS
        self.itc_vl = ContrastiveHeads(dim)   # on the VL-branch CLS
        self.pooler = Pooler(dim)
        self.itm_head = nn.Linear(dim, 2)
        self.mlm_head = MLMHead(cfg, tp_group)
        self.mim_head = MIMHead(cfg)
        for name, module in (heads or {}).items():
            self.add_module(name, module)
        self.init_seed: int | None = None  # set by build_model; model/initialization.py draws from it


def build_model(cfg: ModelConfig | str, device: str | torch.device = "cpu", tp_group=None,
                heads: dict[str, nn.Module] | None = None, seed: int | None = None, **overrides) -> VLMo:
    """Build VLMo from a config or preset name, initialised from `seed` on `device`.

    device="meta" allocates nothing (for counting, or to materialise a part: model/initialization.py
    materialize, parallel/stage_build.py build_stage). The model is always constructed on meta and
    then materialised, so the whole build and any part give the same numbers for the same seed.
    seed: None draws one from torch's global generator (torch.manual_seed before the call fixes the
    weights); recorded as model.init_seed.
    heads: a fine-tuning task's modules (Task.heads(cfg, options)), initialised as the others.
    tp_group: the tensor-parallel process group to split the weights over; None is one process and
    needs no torch.distributed (nothing here creates a group or initialises distributed)."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg, **overrides)
    elif overrides:
        cfg = cfg.replace(**overrides)
    heads = {name: module.to("meta") for name, module in (heads or {}).items()}
    with torch.device("meta"):
        model = VLMo(cfg, tp_group, heads)
    model.init_seed = draw_seed() if seed is None else seed
    if torch.device(device).type != "meta":
        materialize(model, None, device)
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
