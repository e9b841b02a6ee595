"""Model configuration and named presets.

A preset is a function returning a `ModelConfig`, so sizes are code that can be read and diffed.
Sizes of base / base_plus / large follow docs/MODEL.md (Presets) exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional


# torch.compile's modes; "reduce-overhead" replays each compiled block as a CUDA graph (no launch
# overhead: what pays for the short text pass), "max-autotune" also benchmarks GEMM configurations
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelConfig:
    name: str = "custom"
    # vision
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    # transformer
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    vl_start: int = 10  # first layer that has the vision-language expert
    layer_scale_init: Optional[float] = 0.1  # None: no gamma parameters (base_plus)
    use_abs_pos_emb: bool = False  # image and text absolute positions (base_plus, giant)
    use_rel_pos_bias: bool = True
    drop_path_rate: float = 0.1
    attn_drop: float = 0.0
    norm_eps: float = 1e-6
    # text
    vocab_size: int = 30522
    max_text_len: int = 40  # rows of the text position table; VL pretraining length
    max_text_len_of_initckpt: int = 196  # text span of the relative position table
    text_norm_eps: float = 1e-12
    text_dropout: Optional[float] = None  # None: drop_path_rate, as the reference (hidden_dropout_prob)
    num_modality_types: int = 2  # 0 text, 1 image (2: NLVR2's second image)
    # pretraining heads
    mim_target: str = "pixel"  # "pixel" (normalised pixels) or "token" (visual-token ids)
    mim_vocab_size: int = 8192
    # execution
    attention: str = "auto"  # "sdpa" (torch's fused kernels), "flex" (FlexAttention), "explicit" (reference math),
    #                          "auto" (see attention.py and docs/PERFORMANCE.md)
    checkpoint_every: int = 0  # activation checkpointing: 0 none, k every k-th block
    compile: bool = False  # torch.compile each block (regional; parallel/parallelize.py)
    compile_mode: str = "default"  # torch.compile mode: "default", or "reduce-overhead" (CUDA graphs), "max-autotune"
    pack_unimodal: bool = False  # stage 3: run the image-only and text-only passes as one packed pass (backbone.py)

    @property
    def text_dropout_rate(self) -> float:
        """Dropout after the text embeddings: the reference's BertEmbeddings use drop_path_rate."""
        return self.drop_path_rate if self.text_dropout is None else self.text_dropout

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_vl_layers(self) -> int:
        return self.depth - self.vl_start

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, tensor_parallel: int = 1, key_prefix: str = "") -> None:
        """Raise ValueError naming the first key that makes this config impossible; keys are written
        as `key_prefix` + field (the run config passes "model.", as its users write them)."""
        def key(name: str) -> str:
            return f"{key_prefix}{name}={getattr(self, name)!r}"

        sizes = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "ffn_dim",
                 "vocab_size", "max_text_len", "max_text_len_of_initckpt", "num_modality_types")
        for name in sizes:  # before the divisibility checks below, which would divide by zero
            if getattr(self, name) < 1:
                raise ValueError(f"model config '{self.name}': {key(name)} must be at least 1")
        checks = [
            (self.embed_dim % self.num_heads == 0, f"{key('embed_dim')} is not divisible by {key('num_heads')}"),
            (self.image_size % self.patch_size == 0,
             f"{key('image_size')} is not divisible by {key('patch_size')}"),
            (0 <= self.vl_start <= self.depth, f"{key('vl_start')} must lie in [0, {key('depth')}]"),
            (self.attention in ("auto", "sdpa", "flex", "explicit"),
             f"{key_prefix}attention must be 'auto', 'sdpa', 'flex' or 'explicit', got {self.attention!r}"),
            (not (self.attention == "flex" and self.attn_drop > 0),
             f"{key('attention')} has no attention dropout: set {key_prefix}attn_drop to 0 or choose another "
             "attention"),
            (isinstance(self.compile, bool), f"{key_prefix}compile must be true or false, got {self.compile!r}"),
            (self.compile_mode in COMPILE_MODES,
             f"{key_prefix}compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"),
            (isinstance(self.pack_unimodal, bool),
             f"{key_prefix}pack_unimodal must be true or false, got {self.pack_unimodal!r}"),
            (self.mim_target in ("pixel", "token"),
             f"{key_prefix}mim_target must be 'pixel' or 'token', got {self.mim_target!r}"),
            (self.checkpoint_every >= 0, f"{key('checkpoint_every')} must be >= 0"),
            (self.max_text_len <= self.max_text_len_of_initckpt or not self.use_rel_pos_bias,
             f"{key('max_text_len')} exceeds {key('max_text_len_of_initckpt')}, the text span of the "
             "relative table"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"model config '{self.name}': {msg}")
        check_tensor_parallel(self, tensor_parallel)


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """The tensor-parallel rule, the one place it is checked: each TP rank holds 1/tp of the attention
    heads, of the FFN columns and of the vocabulary rows, so tp must divide all three."""
    for key in ("num_heads", "ffn_dim", "vocab_size"):
        value = getattr(cfg, key)
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {key}={value} of '{cfg.name}': "
                             "pick a tp that divides heads, FFN and vocabulary")


PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown model config key(s) {sorted(unknown)}")
    return cfg.replace(**overrides)


@register
def tiny() -> ModelConfig:
    """Tests and the CPU demo: 4 layers, width 64, 64 px images."""
    return ModelConfig(name="tiny", image_size=64, patch_size=16, embed_dim=64, depth=4,
                       num_heads=4, ffn_dim=256, vl_start=2, vocab_size=1024, max_text_len=32,
                       max_text_len_of_initckpt=64, drop_path_rate=0.0)


@register
def base() -> ModelConfig:
    return ModelConfig(name="base", embed_dim=768, depth=12, num_heads=12, ffn_dim=3072, vl_start=10)


@register
def base_plus() -> ModelConfig:
    return ModelConfig(name="base_plus", embed_dim=544, depth=24, num_heads=16, ffn_dim=2176,
                       vl_start=21, layer_scale_init=None, use_abs_pos_emb=True,
                       use_rel_pos_bias=False)


@register
def large() -> ModelConfig:
    return ModelConfig(name="large", embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096, vl_start=21)


@register
def giant() -> ModelConfig:
    """BEiT-3 giant sizes: ~1.9B parameters; absolute positions as in BEiT-3."""
    return ModelConfig(name="giant", patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                       ffn_dim=6144, vl_start=37, layer_scale_init=None, use_abs_pos_emb=True,
                       use_rel_pos_bias=False, vocab_size=64000)


@register
def xl_6b() -> ModelConfig:
    """This project's multi-node preset (~6.5B parameters): 48 layers of width 2560."""
    return ModelConfig(name="xl_6b", patch_size=14, embed_dim=2560, depth=48, num_heads=32,
                       ffn_dim=10240, vl_start=44, layer_scale_init=None, use_abs_pos_emb=True,
                       use_rel_pos_bias=False, vocab_size=64000)
