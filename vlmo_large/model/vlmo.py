"""VLMo: the MoME backbone plus the pooler and every pretraining head."""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from vlmo_large.config import ModelConfig, get_preset
from vlmo_large.model.backbone import MoMEBackbone
from vlmo_large.model.heads import ContrastiveHeads, MIMHead, MLMHead, Pooler


class VLMo(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group=None):
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
        for module in (self.itc, self.itc_vl, self.pooler, self.itm_head, self.mlm_head, self.mim_head):
            module.apply(_init_plain)
        trunc_normal_(self.mim_head.mask_token, std=0.02)


def _init_plain(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig | str, device: str | torch.device = "cpu", tp_group=None, **overrides) -> VLMo:
    """Build VLMo from a config or preset name. device="meta" allocates nothing (for counting).

    tp_group: the tensor-parallel process group to split the weights over; None is one process and
    needs no torch.distributed (nothing here creates a group or initialises distributed)."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg, **overrides)
    elif overrides:
        cfg = cfg.replace(**overrides)
    with torch.device(device):
        return VLMo(cfg, tp_group)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
