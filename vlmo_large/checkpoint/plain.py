"""The plain checkpoint: full (unsharded) tensors in safetensors files plus `config.json`.

A folder holds `model.safetensors`, or, when split by size, `model-0000i-of-0000n.safetensors`
files and a `model.safetensors.index.json` (HF's layout: {"metadata": {"total_size"},
"weight_map": {tensor: file}}). `config.json` holds the ModelConfig fields and the naming
("vlmo_large" or "reference"). Reading is lazy, one tensor at a time, by the model's names: the
merged relative table on disk reads as each block's own (formats/rel_pos_tables.py).
A training export (write_export) also carries preprocessing.json, the tokenizer, task.json and a
MODEL_CARD.md, so evaluation and `--init` need no other flag.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from vlmo_large.checkpoint.safetensors_stream import nbytes, plan_shards, write_streamed
from vlmo_large.config import ModelConfig
from vlmo_large.formats.io import CheckpointError
from vlmo_large.formats.rel_pos_tables import MERGED, block_columns, merge_tables

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEGACY_EXPORT_CONFIG = "model_config.json"  # what training exports named config.json until 2026-12
NAMING_KEY = "naming"  # in config.json: which tensor names the files use
# an export's other files (write_export)
PREPROCESSING_NAME = "preprocessing.json"
TOKENIZER_NAMES = ("tokenizer.model", "vocab.txt")  # SentencePiece, WordPiece
TASK_NAME = "task.json"
ANSWERS_NAME = "answers.json"
CARD_NAME = "MODEL_CARD.md"


def config_to_dict(cfg: ModelConfig, naming: str = "vlmo_large") -> dict:
    return {**dataclasses.asdict(cfg), NAMING_KEY: naming}


def config_from_dict(values: dict, source: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(values) - fields - {NAMING_KEY}
    if unknown:
        raise CheckpointError(f"{source}: unknown model config key(s) {sorted(unknown)}")
    return ModelConfig(**{k: v for k, v in values.items() if k in fields})


def write_plain(out_dir: str, entries: list[tuple[str, tuple, torch.dtype]],
                fetch: Callable[[str], torch.Tensor], cfg: ModelConfig | None, naming: str = "vlmo_large",
                max_shard_bytes: int = 5 * 10 ** 9, desc: str = "writing") -> list[str]:
    """Stream `entries` into a plain checkpoint folder; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    shards = plan_shards(entries, max_shard_bytes)
    files = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with tqdm(total=len(entries), desc=desc, unit="tensor") as bar:
        for file, indices in zip(files, shards):
            write_streamed(os.path.join(out_dir, file), [entries[i] for i in indices], fetch,
                           metadata={"format": "pt"}, on_tensor=lambda _: bar.update())
    if len(files) > 1:
        weight_map = {entries[i][0]: file for file, indices in zip(files, shards) for i in indices}
        total = sum(nbytes(shape, dtype) for _, shape, dtype in entries)
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(os.path.join(out_dir, INDEX_NAME)):
        os.remove(os.path.join(out_dir, INDEX_NAME))  # a stale index would point at other files
    if cfg is not None:
        with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
            json.dump(config_to_dict(cfg, naming), f, indent=2)
    return files


@dataclass
class ExportExtras:
    """What a training run adds to its export besides the weights, so that readers need no other
    flag: the tokenizer to copy, the task and its options (a VQA answer vocabulary is copied), and
    the model card's facts (preset, data, steps, final metrics)."""
    tokenizer: str | None = None
    task: str | None = None
    task_options: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _copy_atomic(src: str, dst: str) -> None:
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def preprocessing_of(cfg: ModelConfig) -> dict:
    """How images and text reach the model at evaluation (data/transforms.py eval_transform)."""
    from vlmo_large.data.transforms import MEAN, STD
    return {"image_size": cfg.image_size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "crop": "squash", "max_text_len": cfg.max_text_len}


def write_export(out_dir: str, state: dict[str, torch.Tensor], cfg: ModelConfig,
                 extras: ExportExtras | None = None) -> str:
    """What a training run exports at its end: the model's tensors in the plain layout (one
    model.safetensors, the merged relative table), config.json (the name every reader of plain
    folders looks for) and preprocessing.json; with `extras` also the tokenizer, task.json (plus
    the VQA answer vocabulary) and MODEL_CARD.md. The folder needs nothing else for `from-plain`,
    `--init` or tools/evaluate.py. Each file is written under a temporary name and renamed.
    Returns the safetensors path."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SINGLE_NAME)
    save_file({k: v.contiguous() for k, v in merge_tables(state).items()}, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    _write_atomic(os.path.join(out_dir, CONFIG_NAME), json.dumps(config_to_dict(cfg), indent=2))
    _write_atomic(os.path.join(out_dir, PREPROCESSING_NAME), json.dumps(preprocessing_of(cfg), indent=2))
    if extras is None:
        return path
    if extras.tokenizer:
        name = TOKENIZER_NAMES[1] if extras.tokenizer.endswith(".txt") else TOKENIZER_NAMES[0]
        _copy_atomic(extras.tokenizer, os.path.join(out_dir, name))
    if extras.task:
        options = dict(extras.task_options)
        if options.get("answers"):
            _copy_atomic(options["answers"], os.path.join(out_dir, ANSWERS_NAME))
            options["answers"] = ANSWERS_NAME  # relative to the export folder
        _write_atomic(os.path.join(out_dir, TASK_NAME), json.dumps({"task": extras.task, "options": options}, indent=2))
    _write_atomic(os.path.join(out_dir, CARD_NAME), model_card(cfg, extras))
    return path


def model_card(cfg: ModelConfig, extras: ExportExtras) -> str:
    card = extras.card
    lines = [f"# VLMo `{cfg.name}`" + (f", task `{extras.task}`" if extras.task else ""), "",
             f"- preset: {cfg.name} ({cfg.depth} layers, width {cfg.embed_dim}, {cfg.image_size} px, "
             f"text {cfg.max_text_len} tokens)"]
    for key in ("init", "data", "steps", "global_batch"):
        if card.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {card[key]}")
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "| final metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "Files: model.safetensors (plain layout), config.json, preprocessing.json"
              + (", the tokenizer" if extras.tokenizer else "") + (", task.json" if extras.task else "")
              + ". Evaluate with `python tools/evaluate.py <this folder> --task <task> --data <shards>`."]
    return "\n".join(lines) + "\n"


def export_file(folder: str, name: str) -> str | None:
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def export_tokenizer(folder: str) -> str | None:
    """The tokenizer an export carries, or None."""
    return next((p for p in (export_file(folder, n) for n in TOKENIZER_NAMES) if p), None)


def export_json(folder: str, name: str) -> dict | None:
    """preprocessing.json or task.json of an export (None when absent); task.json's answer
    vocabulary comes back as a path."""
    path = export_file(folder, name)
    if path is None:
        return None
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    answers = (values.get("options") or {}).get("answers") if name == TASK_NAME else None
    if answers:
        values["options"]["answers"] = os.path.join(folder, answers)
    return values


def write_plain_dict(out_dir: str, state: dict[str, torch.Tensor], cfg: ModelConfig | None,
                     naming: str = "vlmo_large", max_shard_bytes: int = 5 * 10 ** 9) -> list[str]:
    entries = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    return write_plain(out_dir, entries, state.__getitem__, cfg, naming, max_shard_bytes)


def _inside(folder: str, file: str, index: str, weight_map: dict) -> None:
    """An index entry must name a file in the checkpoint folder: an absolute path, `..` or a link
    leading elsewhere would load whatever file it points at."""
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, file))
    if os.path.isabs(file) or os.path.dirname(target) != root:
        tensor = next((n for n, f in weight_map.items() if f == file), "?")
        raise CheckpointError(f"{index}: entry '{tensor}' -> {file!r} points outside the checkpoint folder "
                              f"{folder}; shard files must sit beside the index")


class PlainCheckpoint:
    """Read a plain checkpoint folder (or one .safetensors file) lazily."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        if os.path.isfile(path):
            folder, files = os.path.dirname(path), [os.path.basename(path)]
            weight_map = None
        elif os.path.isfile(os.path.join(path, INDEX_NAME)):
            folder = path
            weight_map = self._read_index(os.path.join(path, INDEX_NAME))
            files = sorted(set(weight_map.values()))
            for file in files:
                _inside(folder, file, os.path.join(path, INDEX_NAME), weight_map)
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            folder, files, weight_map = path, [SINGLE_NAME], None
        else:
            raise CheckpointError(f"{path}: not a plain checkpoint (no {SINGLE_NAME} or {INDEX_NAME})")
        self.folder = folder
        self._handles, self._where = {}, {}
        for file in files:
            full = os.path.join(folder, file)
            if not os.path.isfile(full):
                lost = [n for n, f in (weight_map or {}).items() if f == file]
                raise CheckpointError(f"shard file {full} is missing (it holds {len(lost)} tensors, "
                                      f"e.g. '{lost[0] if lost else '?'}')")
            try:
                self._check_size(full)
                handle = safe_open(full, framework="pt")
                names = list(handle.keys())
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"cannot read safetensors file {full} (truncated or corrupt?): {exc}") from exc
            self._handles[full] = handle
            for name in names:
                self._where[name] = full
        for name, file in (weight_map or {}).items():
            if self._where.get(name) != os.path.join(folder, file):
                raise CheckpointError(f"tensor '{name}' is listed in {INDEX_NAME} under {file} but that file "
                                      "does not hold it")
        # the model's per-block relative tables: columns of the merged one the file holds
        self._columns = {} if MERGED not in self._where else \
            block_columns(self._where, self._stored_shape(MERGED), self._where[MERGED])

    @staticmethod
    def _read_index(path: str) -> dict[str, str]:
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read index {path}: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path}: 'weight_map' must map tensor names to file names")
        return weight_map

    @staticmethod
    def _check_size(path: str) -> None:
        """Compare the file's length with its header, to name the tensors a truncation cut."""
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > os.path.getsize(path):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        need = 8 + header_len + max((v["data_offsets"][1] for v in tensors.values()), default=0)
        have = os.path.getsize(path)
        if have < need:
            cut = sorted(k for k, v in tensors.items() if 8 + header_len + v["data_offsets"][1] > have)
            raise CheckpointError(f"{path} is truncated: {have} bytes, the header needs {need}; tensor "
                                  f"'{cut[0]}'" + (f" and {len(cut) - 1} more are" if len(cut) > 1 else " is") + " cut")

    def names(self) -> list[str]:
        """The model's tensor names (each block's relative table, not the merged one stored)."""
        return [n for name in self._where for n in (self._columns if name == MERGED else [name])]

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._columns

    def file_of(self, name: str) -> str:
        return self._where[MERGED if name in self._columns else name]

    def _stored_shape(self, name: str) -> tuple:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def shape(self, name: str) -> tuple:
        if name in self._columns:
            cols = self._columns[name]
            return self._stored_shape(MERGED)[0], cols.stop - cols.start
        return self._stored_shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        stored = MERGED if name in self._columns else name
        try:
            handle = self._handles[self._where[stored]]
            if name in self._columns:
                return handle.get_slice(MERGED)[:, self._columns[name]]
            return handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self._where[stored]}: cannot read tensor '{stored}': {exc}") from exc

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.names()}

    def config_dict(self) -> dict | None:
        path = os.path.join(self.folder, CONFIG_NAME)
        if not os.path.isfile(path):  # exports written before config.json was the one name
            path = os.path.join(self.folder, LEGACY_EXPORT_CONFIG)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc

    def config(self) -> ModelConfig | None:
        values = self.config_dict()
        return None if values is None else config_from_dict(values, os.path.join(self.folder, CONFIG_NAME))

    @property
    def naming(self) -> str:
        return (self.config_dict() or {}).get(NAMING_KEY, "vlmo_large")
