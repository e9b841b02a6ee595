"""MoME as pipeline layers that pass one tuple of named streams from stage to stage.

DeepSpeed's pipeline engine sends a tuple of tensors between stages and returns a gradient for
every floating tensor in it (integer tensors, the masks, travel without one). The *mode* fixes
which streams the tuple holds:

    vl        image, text, text_mask, pair, pair_mask (+ image_vl, text_vl from layer vl_start)
    dual      image, text, text_mask                   (no-grad pass: ITC features only)
    mim       image                                    (stage 1, masked patches)
    text_mlm  text, text_mask                          (stage 2)

`pair` holds every fused sequence of a stage-3 step in one batch, in the order of
training/objectives.py: the B MLM pairs (masked text), then the 3B ITM pairs (positive, negative
image, negative text), so one block call serves all. Layer 0 embeds, layer 1 + i applies MoME
block i to each stream with that stream's route, the last layer applies the final norm and holds
the heads, which the loss (pipeline_losses.py) applies. Each block owns its relative-position table,
so a stage holds only its layers' bias.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmo_large.config import ModelConfig
from vlmo_large.model.backbone import IMAGE_ROW, TEXT_ROW
from vlmo_large.model.block import MoMEBlock
from vlmo_large.model.embeddings import ImageEmbeddings, TextEmbeddings
from vlmo_large.model.heads import ContrastiveHeads, MLMHead, Pooler
from vlmo_large.model.tensor_parallel import init_normal
from vlmo_large.model.vlmo import _init_plain

# Pretraining stage (run_config.STAGES) -> the modes its pipeline runs; the first is its training mode.
STAGE_MODES = {"mim": ("mim",), "text_mlm": ("text_mlm",), "vl": ("vl", "dual")}
MODE_STREAMS = {
    "vl": ("image", "text", "text_mask", "pair", "pair_mask"),
    "dual": ("image", "text", "text_mask"),
    "mim": ("image",),
    "text_mlm": ("text", "text_mask"),
}
VL_STREAMS = ("image_vl", "text_vl")
MASKS = {"text": "text_mask", "text_vl": "text_mask", "pair": "pair_mask"}


def stream_names(mode: str, num_tensors: int) -> tuple[str, ...]:
    """Names of the tensors in a tuple of this mode; the VL branch shows as two extra tensors."""
    names = MODE_STREAMS[mode]
    return names + VL_STREAMS if num_tensors == len(names) + len(VL_STREAMS) else names


def as_tuple(inputs) -> tuple:
    return (inputs,) if torch.is_tensor(inputs) else tuple(inputs)


class PipelineLayer(nn.Module):
    """A layer that knows the current mode and the plain (VLMo) name of each of its parameters."""

    plain_prefixes: dict[str, str] = {}

    def __init__(self, cfg: ModelConfig, stage: str):
        super().__init__()
        self.cfg, self.stage, self.mode = cfg, stage, STAGE_MODES[stage][0]

    def plain_name(self, local: str) -> str:
        for prefix, plain in self.plain_prefixes.items():
            if local.startswith(prefix):
                return plain + local[len(prefix):]
        raise KeyError(f"{type(self).__name__} has no plain name for '{local}'")

    def init_plain_modules(self) -> None:
        """The initialisation VLMo gives its plain (non-megatron) modules."""
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                init_normal(module.weight)
            else:
                _init_plain(module)


class EmbeddingLayer(PipelineLayer):
    plain_prefixes = {"text_embeddings.": "backbone.text_embeddings.", "patch_embed.": "backbone.patch_embed.",
                      "modality_embed.": "backbone.modality_embed.", "mask_token": "mim_head.mask_token"}

    def __init__(self, cfg: ModelConfig, stage: str, tp_group=None):
        super().__init__(cfg, stage)
        self.text_embeddings = TextEmbeddings(cfg, tp_group) if stage in ("text_mlm", "vl") else None
        self.patch_embed = ImageEmbeddings(cfg) if stage in ("mim", "vl") else None
        self.modality_embed = nn.Embedding(cfg.num_modality_types, cfg.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if stage == "mim" else None
        self.init_plain_modules()
        if self.mask_token is not None:
            init_normal(self.mask_token)

    def _text(self, ids):
        return self.text_embeddings(ids) + self.modality_embed.weight[TEXT_ROW]

    def _image(self, images, mim_mask=None):
        mask_token = None if mim_mask is None else self.mask_token
        return self.patch_embed(images, mim_mask, mask_token) + self.modality_embed.weight[IMAGE_ROW]

    def forward(self, inputs):
        inputs = as_tuple(inputs)
        if self.mode == "vl":
            images, ids, mask, pair_ids, pair_mask, pair_images = inputs
            pair = torch.cat([self._text(pair_ids), self._image(pair_images)], 1)
            return self._image(images), self._text(ids), mask, pair, pair_mask
        if self.mode == "dual":
            images, ids, mask = inputs
            return self._image(images), self._text(ids), mask
        if self.mode == "mim":
            images, mim_mask = inputs
            return (self._image(images, mim_mask.bool()),)
        ids, mask = inputs
        return self._text(ids), mask


class BlockLayer(PipelineLayer):
    """MoME block `index` applied to every stream of the tuple, each with its own route."""

    def __init__(self, cfg: ModelConfig, stage: str, index: int, tp_group=None):
        super().__init__(cfg, stage)
        self.index = index
        rate = cfg.drop_path_rate * index / max(cfg.depth - 1, 1)  # the backbone's linspace
        self.block = MoMEBlock(cfg, index, rate, tp_group)  # with its own relative table
        self.plain_prefixes = {"block.": f"backbone.blocks.{index}."}

    def _bias(self, kind: str, text_len: int):
        return None if self.block.rel_pos is None else self.block.rel_pos(kind, text_len)

    def _route(self, name: str) -> tuple[str, str]:
        """(expert route, relative-bias kind) of a stream at this layer."""
        if name == "pair":
            return ("pair" if self.index < self.cfg.vl_start else "vl"), "pair"
        kind = "image" if name.startswith("image") else "text"
        if name.endswith("_vl"):
            return "vl", kind
        return ("imag" if kind == "image" else "text"), kind

    def _run_streams(self, *tensors):
        streams = dict(zip(stream_names(self.mode, len(tensors)), tensors))
        if self.mode == "vl" and self.index == self.cfg.vl_start:
            # the VL branch of ITC starts from the image/text states of layer vl_start - 1
            streams["image_vl"], streams["text_vl"] = streams["image"], streams["text"]
        text_len = streams["text_mask"].shape[1] if "text_mask" in streams else 0
        masks = {"text_mask": None, "pair_mask": None}
        if "text_mask" in streams:
            masks["text_mask"] = streams["text_mask"].bool()
        if "pair_mask" in streams:
            pair_mask = streams["pair_mask"].bool()
            image_len = streams["pair"].shape[1] - pair_mask.shape[1]
            masks["pair_mask"] = torch.cat([pair_mask, pair_mask.new_ones(pair_mask.shape[0], image_len)], 1)
        biases = {}
        out = []
        for name, x in streams.items():
            if name.endswith("_mask"):
                out.append(x)
                continue
            route, kind = self._route(name)
            if kind not in biases:
                biases[kind] = self._bias(kind, text_len)
            key_mask = masks[MASKS[name]] if name in MASKS else None
            out.append(self.block(x, route, biases[kind], key_mask, text_len))
        return tuple(out)

    def forward(self, inputs):
        inputs = as_tuple(inputs)
        every = self.cfg.checkpoint_every
        if every and self.training and torch.is_grad_enabled() and self.index % every == 0:
            return checkpoint(self._run_streams, *inputs, use_reentrant=False)
        return self._run_streams(*inputs)


class HeadLayer(PipelineLayer):
    """Final norm, and the heads of this stage for the loss to apply (it needs the labels first:
    the MLM head only sees masked positions, the ITC heads the gathered batch)."""

    plain_prefixes = {"norm.": "backbone.norm.", "mim_predictor.": "mim_head.predictor.", "itc.": "itc.",
                      "itc_vl.": "itc_vl.", "pooler.": "pooler.", "itm_head.": "itm_head.", "mlm_head.": "mlm_head."}

    def __init__(self, cfg: ModelConfig, stage: str, tp_group=None):
        super().__init__(cfg, stage)
        dim = cfg.embed_dim
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        if stage == "vl":
            self.itc, self.itc_vl = ContrastiveHeads(dim), ContrastiveHeads(dim)
            self.pooler, self.itm_head = Pooler(dim), nn.Linear(dim, 2)
        if stage in ("text_mlm", "vl"):
            self.mlm_head = MLMHead(cfg, tp_group)
        if stage == "mim":
            out = cfg.patch_size ** 2 * cfg.in_chans if cfg.mim_target == "pixel" else cfg.mim_vocab_size
            self.mim_predictor = nn.Linear(dim, out)
        self.init_plain_modules()

    def forward(self, inputs):
        """-> vl: (image CLS, text CLS, image_vl CLS, text_vl CLS, pair); dual: (image CLS, text CLS);
        mim: patch states; text_mlm: text states. All after the final norm."""
        inputs = as_tuple(inputs)
        streams = dict(zip(stream_names(self.mode, len(inputs)), inputs))
        if self.mode == "mim":
            return self.norm(streams["image"])[:, 1:]
        if self.mode == "text_mlm":
            return self.norm(streams["text"])
        cls = (self.norm(streams["image"])[:, 0], self.norm(streams["text"])[:, 0])
        if self.mode == "dual":
            return cls
        return (*cls, self.norm(streams["image_vl"])[:, 0], self.norm(streams["text_vl"])[:, 0],
                self.norm(streams["pair"]))
