"""VLMo's initial weights as a pure function of (seed, tensor name), and materialising part of a meta model.

Each parameter draws from its own generator, seeded by the run seed and the parameter's full VLMo
name (`backbone.blocks.3.attn.qkv.weight`), on the host over the full (unsplit) tensor; a
tensor-parallel rank keeps its slice of that, split as megatron splits (partition_dim,
partition_stride). So initialising any subset of the model (one pipeline stage, one TP rank, on any
device) gives exactly the numbers of the whole-model build at TP=1, and the order in which tensors
are initialised does not matter.

    model = build_model(cfg, device="meta", tp_group=tp_group, seed=seed)   # no storage anywhere
    materialize(model, names, device)   # storage and initial values for `names` only

build_model(cfg, device) is the second line with every name. The distributions are those of the
reference (BEiT-style): truncated normal (std 0.02) for linear, embedding and token weights, zero
biases and relative tables, LayerNorm at 1/0, torch's own default for the patch convolution,
constants for the layer scales and the contrastive temperature.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from vlmo_large.model.attention import SelfAttention
from vlmo_large.model.block import MoMEBlock
from vlmo_large.model.backbone import IMAGE_ROW, SECOND_IMAGE_ROW
from vlmo_large.model.embeddings import ImageEmbeddings
from vlmo_large.model.heads import INIT_LOGIT_SCALE, ContrastiveHeads, MIMHead
from vlmo_large.model.relative_position import RelativePositionBias
from vlmo_large.model.tensor_parallel import (ColumnLinear, RowLinear, VocabEmbedding, group_size, init_normal,
                                              placement, shard)

_NORMAL_WEIGHTS = (nn.Linear, ColumnLinear, RowLinear, nn.Embedding, VocabEmbedding)
_NORMAL_TOKENS = (ImageEmbeddings, MIMHead)  # cls_token, pos_embed; mask_token
_ZERO_TENSORS = (SelfAttention, RelativePositionBias)  # q_bias, v_bias; the relative table
_PIECE = 1 << 22  # elements per piece of a normal initialisation (_normal)


def draw_seed() -> int:
    """A seed from torch's global generator: torch.manual_seed(s) before build_model fixes the weights."""
    return int(torch.randint(2 ** 62, ()))


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor `name` (a stable hash: Python's hash() of a str varies per process)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def materialize(model: nn.Module, names: Optional[Iterable[str]], device: str | torch.device,
                seed: Optional[int] = None) -> None:
    """Give the parameters `names` (full VLMo names; None: all) storage on `device` and their
    initial values; the others keep what they hold (on a meta build: no storage).

    A pipeline rank's build (vlmo_large/parallel/stage_build.py:build_stage) is
        model = build_model(cfg, "meta", tp_group, seed=seed)
        materialize(model, <the names of its stage's parameters>, device)
    seed: default the one build_model recorded (model.init_seed). A parameter's attributes
    (megatron's TP placement, requires_grad) are kept.
    """
    seed = model.init_seed if seed is None else seed
    wanted = _check_names(model, names)
    modules = dict(model.named_modules())
    for name, param in list(model.named_parameters()):
        if name in wanted:
            owner_name, _, attr = name.rpartition(".")
            fresh = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
            fresh.__dict__.update(param.__dict__)  # to_empty would drop megatron's placement attributes
            setattr(modules[owner_name], attr, fresh)
    init_weights(model, seed, wanted)


def init_weights(model: nn.Module, seed: int, names: Optional[Iterable[str]] = None) -> None:
    """Re-initialise the parameters `names` (None: all) in place, with the values of `materialize`."""
    wanted = _check_names(model, names)
    modules = dict(model.named_modules())
    rank, size = _tp_position(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in wanted:
                owner_name, _, attr = name.rpartition(".")
                _fill(param, _initializer(modules[owner_name], attr, name), tensor_seed(seed, name), rank, size)


def _check_names(model: nn.Module, names: Optional[Iterable[str]]) -> set[str]:
    every = {name for name, _ in model.named_parameters()}
    if names is None:
        return every
    wanted = set(names)
    if unknown := sorted(wanted - every):
        raise KeyError(f"not parameters of {type(model).__name__}: {', '.join(unknown[:5])}")
    return wanted


def _tp_position(model: nn.Module) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group the model's TP weights are split over."""
    group = model.backbone.tp_group
    return (0, 1) if group is None else (group.rank(), group_size(group))


def _fill(param: torch.Tensor, init: Callable, seed: int, rank: int, size: int) -> None:
    """Initialise the full tensor on the host from its own generator; keep this rank's slice."""
    generator = torch.Generator().manual_seed(seed)
    where = placement(param) if size > 1 else None
    if where is None and param.device.type == "cpu" and param.dtype == torch.float32:
        init(param, generator)  # in place: no host copy of a large tensor
        return
    shape = list(param.shape)
    if where is not None:
        shape[where[0]] *= size
    full = torch.empty(shape, dtype=torch.float32)
    init(full, generator)
    param.copy_(full if where is None else shard(full, *where, rank, size))


def _initializer(owner: nn.Module, attr: str, name: str) -> Callable[[torch.Tensor, torch.Generator], None]:
    """How parameter `attr` of module `owner` starts (full name `name`, for the error)."""
    if name == "backbone.modality_embed.weight":
        return _modality_rows
    if isinstance(owner, nn.LayerNorm):
        return _constant(1.0 if attr == "weight" else 0.0)
    if isinstance(owner, nn.Conv2d):
        return _conv_weight if attr == "weight" else _conv_bias(owner)
    if attr == "bias" or isinstance(owner, _ZERO_TENSORS):
        return _constant(0.0)
    if isinstance(owner, _NORMAL_WEIGHTS + _NORMAL_TOKENS):
        return _normal
    if isinstance(owner, MoMEBlock):  # gamma_1, gamma_2
        return _constant(owner.layer_scale_init)
    if isinstance(owner, ContrastiveHeads):  # logit_scale
        return _constant(INIT_LOGIT_SCALE)
    raise TypeError(f"no initial values for '{name}' ({type(owner).__name__}.{attr}): "
                    f"add its rule to vlmo_large/model/initialization.py")


def _normal(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """init_normal over flat pieces of the tensor: torch's trunc_normal_ holds boolean masks of its
    tensor's size, which for a vocabulary table (655 MB at xl_6b) would add ~0.5 GB to a stage's
    peak; a piece's are ~12 MB."""
    for piece in tensor.view(-1).split(_PIECE):
        init_normal(piece, generator=generator)


def _modality_rows(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """The modality-type rows; NLVR2's second image row starts as the image row (docs/MODEL.md section 8)."""
    _normal(tensor, generator)
    tensor[SECOND_IMAGE_ROW:] = tensor[IMAGE_ROW]


def _constant(value: float) -> Callable[[torch.Tensor, torch.Generator], None]:
    return lambda tensor, generator: tensor.fill_(value)


def _conv_weight(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """torch's Conv2d default (reset_parameters), drawn from the tensor's generator."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _conv_bias(conv: nn.Conv2d) -> Callable[[torch.Tensor, torch.Generator], None]:
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    bound = 1 / math.sqrt(fan_in)
    return lambda tensor, generator: nn.init.uniform_(tensor, -bound, bound, generator=generator)
