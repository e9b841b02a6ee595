"""The reference VLMo checkpoint layout (docs/MODEL.md section 7) <-> this project's names.

Both layouts hold the same tensors with the same shapes (the merged relative table included: the
model's per-block tables are merged and split by formats/rel_pos_tables.py), so conversion is
renaming, plus resampling the relative table or absolute positions when the
checkpoint was trained at another image size. One exception: the reference's logit scales are
0-dim, ours hold one element (DeepSpeed's broadcast and clipping need a dimension).

Fine-tuned reference checkpoints add the task's classifier (`vqa_classifier.{0,1,3}.*`,
`nlvr2_classifier.{0,1,3}.*`, the same names here) and, for NLVR2, a third modality-type row;
`finetuned_config` and `finetuned_heads` read both from the tensors' names and shapes, so a model
built from them loads the file with nothing left out.
"""
from __future__ import annotations

import os
import re

import torch

from vlmo_large.config import ModelConfig
from vlmo_large.formats.io import LoadReport, load_into, load_torch_file
from vlmo_large.formats.rel_pos_tables import merge_tables, split_tables
from vlmo_large.model.heads import nlvr2_classifier, vqa_classifier
from vlmo_large.model.relative_position import resample_table

_EXPERT = {"text": "text", "imag": "imag", "vl": "vl"}

# (this project's name, reference name); `{i}` is a layer index, `{e}` an expert, `{p}` weight|bias.
_PAIRS = [
    ("backbone.text_embeddings.word_embeddings.weight", "text_embeddings.word_embeddings.weight"),
    ("backbone.text_embeddings.position_embeddings.weight", "text_embeddings.position_embeddings.weight"),
    ("backbone.text_embeddings.token_type_embeddings.weight", "text_embeddings.token_type_embeddings.weight"),
    ("backbone.text_embeddings.norm.{p}", "text_embeddings.LayerNorm.{p}"),
    ("backbone.patch_embed.proj.{p}", "transformer.patch_embed.proj.{p}"),
    ("backbone.patch_embed.cls_token", "transformer.cls_token"),
    ("backbone.patch_embed.pos_embed", "transformer.pos_embed"),
    ("backbone.modality_embed.weight", "token_type_embeddings.weight"),
    ("backbone.rel_pos.table", "relative_position_bias_table"),
    ("backbone.blocks.{i}.rel_pos.table", "relative_position_bias_table"),  # its columns (names only)
    ("backbone.norm.{p}", "transformer.norm.{p}"),
    ("backbone.blocks.{i}.norm1.{p}", "transformer.blocks.{i}.norm1.{p}"),
    ("backbone.blocks.{i}.gamma_1", "transformer.blocks.{i}.gamma_1"),
    ("backbone.blocks.{i}.gamma_2", "transformer.blocks.{i}.gamma_2"),
    ("backbone.blocks.{i}.attn.qkv.weight", "transformer.blocks.{i}.attn.qkv.weight"),
    ("backbone.blocks.{i}.attn.q_bias", "transformer.blocks.{i}.attn.q_bias"),
    ("backbone.blocks.{i}.attn.v_bias", "transformer.blocks.{i}.attn.v_bias"),
    ("backbone.blocks.{i}.attn.proj.{p}", "transformer.blocks.{i}.attn.proj.{p}"),
    ("backbone.blocks.{i}.experts.{e}.norm.{p}", "transformer.blocks.{i}.norm2_{e}.{p}"),
    ("backbone.blocks.{i}.experts.{e}.fc1.{p}", "transformer.blocks.{i}.mlp_{e}.fc1.{p}"),
    ("backbone.blocks.{i}.experts.{e}.fc2.{p}", "transformer.blocks.{i}.mlp_{e}.fc2.{p}"),
    ("itc.image_proj.weight", "itc_image_proj.fc.weight"),
    ("itc.text_proj.weight", "itc_text_proj.fc.weight"),
    ("itc.logit_scale", "logit_scale"),
    ("itc_vl.image_proj.weight", "itc_vl_image_proj.fc.weight"),
    ("itc_vl.text_proj.weight", "itc_vl_text_proj.fc.weight"),
    ("itc_vl.logit_scale", "logit_vl_scale"),
    ("pooler.dense.{p}", "pooler.dense.{p}"),
    ("itm_head.{p}", "itm_score.fc.{p}"),
    ("mlm_head.dense.{p}", "mlm_score.transform.dense.{p}"),
    ("mlm_head.norm.{p}", "mlm_score.transform.LayerNorm.{p}"),
    ("mlm_head.decoder.weight", "mlm_score.decoder.weight"),
    ("mlm_head.decoder.bias", "mlm_score.bias"),
    ("vqa_classifier.{n}.{p}", "vqa_classifier.{n}.{p}"),  # fine-tuning heads (model/heads.py ClassifierMLP)
    ("nlvr2_classifier.{n}.{p}", "nlvr2_classifier.{n}.{p}"),
]
# Buffers of the reference model that carry no learned state.
_REFERENCE_BUFFERS = re.compile(r"(^|\.)(position_ids|relative_position_index|text_relative_position_index|"
                                r"text_imag_relative_position_index)$")

REFERENCE_SCALARS = ("logit_scale", "logit_vl_scale")  # 0-dim there, 1 element here
POSITION_IDS = "text_embeddings.position_ids"

_GROUPS = {"{i}": r"(?P<i>\d+)", "{e}": r"(?P<e>text|imag|vl)", "{p}": r"(?P<p>weight|bias)",
           "{n}": r"(?P<n>[013])"}  # {n}: the classifiers' Linear, LayerNorm, Linear


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key, group in _GROUPS.items():
        pattern = pattern.replace(re.escape(key), group)
    return re.compile(f"^{pattern}$")


_TO_REF = [(_compile(ours), ref) for ours, ref in _PAIRS]
_FROM_REF = [(_compile(ref), ours) for ours, ref in _PAIRS]


def _rename(name: str, rules) -> str | None:
    for pattern, template in rules:
        match = pattern.match(name)
        if match:
            out = template
            for key, value in match.groupdict().items():
                out = out.replace("{" + key + "}", value)
            return out
    return None


def our_name(reference_name: str) -> str | None:
    """This project's name of a reference tensor name (None if it is not one)."""
    return _rename(reference_name, _FROM_REF)


def to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's state dict (plain, or the model's: its block tables are merged first) ->
    reference names. Project-only tensors (MIM head) are dropped. Given names only (no tensors),
    each block table maps to the merged table's reference name."""
    if all(torch.is_tensor(v) for v in state.values()):
        state = merge_tables(state)
    out = {}
    for name, tensor in state.items():
        ref = _rename(name, _TO_REF)
        if ref is not None:
            out[ref] = tensor.reshape(()) if ref in REFERENCE_SCALARS and torch.is_tensor(tensor) else tensor
    return out


MODALITY_ROWS = "backbone.modality_embed.weight"


def finetuned_config(shapes: dict[str, tuple], cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the modality-type rows the checkpoint holds (3 in an NLVR2 one). shapes: {this
    project's name: shape} of the checkpoint's tensors."""
    rows = shapes.get(MODALITY_ROWS, (cfg.num_modality_types,))[0]
    return cfg if rows == cfg.num_modality_types else cfg.replace(num_modality_types=rows)


def finetuned_heads(shapes: dict[str, tuple], cfg: ModelConfig) -> dict:
    """The fine-tuning heads the checkpoint holds, built to its shapes (build_model(cfg, heads=...)):
    a VQA classifier as wide as its answers, an NLVR2 classifier. shapes: as finetuned_config."""
    heads = {}
    if "vqa_classifier.3.weight" in shapes:
        heads["vqa_classifier"] = vqa_classifier(cfg.embed_dim, shapes["vqa_classifier.3.weight"][0])
    if "nlvr2_classifier.3.weight" in shapes:
        heads["nlvr2_classifier"] = nlvr2_classifier(cfg.embed_dim)
    return heads


def reference_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The buffers the reference's state dict holds besides our tensors, for its strict loading.

    Its BertEmbeddings (transformers 4.8.1, the reference's pin) registers a persistent
    `position_ids` = arange(max_position_embeddings)[None] with max_position_embeddings =
    max_text_len; its relative-position indices are plain attributes, not in the state dict."""
    return {POSITION_IDS: torch.arange(cfg.max_text_len, dtype=torch.int64)[None]}


def from_reference(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, list[str], list[str]]:
    """Reference names -> this project's (each block's relative table). Returns (state, unused
    reference keys, converted keys)."""
    out, unused, converted = {}, [], []
    for name, tensor in state.items():
        ours = _rename(name, _FROM_REF)
        if ours is None:
            if not _REFERENCE_BUFFERS.search(name):
                unused.append(name)
            continue
        out[ours] = tensor.reshape(1) if name in REFERENCE_SCALARS else tensor
    table = out.get("backbone.rel_pos.table")
    if table is not None:
        old_grid = _grid_of_table(table.shape[0], cfg)
        if old_grid != cfg.grid_size:
            out["backbone.rel_pos.table"] = resample_table(table, old_grid, cfg.grid_size)
            converted.append(f"backbone.rel_pos.table (grid {old_grid} -> {cfg.grid_size})")
    return split_tables(out), unused, converted


def _grid_of_table(rows: int, cfg: ModelConfig) -> int:
    image_rows = rows - 2 * cfg.max_text_len_of_initckpt - 2 - 3
    side = round(image_rows ** 0.5)
    if side * side != image_rows or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table with {rows} rows does not fit text span "
                         f"{cfg.max_text_len_of_initckpt} (max_text_len_of_initckpt)")
    return (side + 1) // 2


def load_reference_checkpoint(model, path: str) -> LoadReport:
    """Load a reference VLMo .pt/.pth/.ckpt (any of its wrappers) into `model` (TP=1)."""
    state, unused, converted = from_reference(load_torch_file(path), model.cfg)
    report = load_into(model, state, source=path)
    report.unexpected += unused
    report.converted += converted
    return report


def save_reference_checkpoint(model, path: str) -> None:
    """Write `model` (TP=1) as the reference code loads it: a torch file with `state_dict`."""
    state = {**to_reference(model.state_dict()), **reference_buffers(model.cfg)}
    save_reference_pt(state, path)


def save_reference_pt(state: dict[str, torch.Tensor], path: str) -> None:
    """`{"state_dict": {name: tensor}}` of plain contiguous CPU tensors and nothing else: what the
    reference's pinned torch 1.8 reads (it cannot read safetensors) and weights_only accepts."""
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    torch.save({"state_dict": plain}, path + ".tmp")
    os.replace(path + ".tmp", path)
