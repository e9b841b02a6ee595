"""The run configuration: dataclasses read from YAML/JSON plus `key=value` overrides.

    cfg = load_run_config("run.yaml", ["schedule.steps=200", "optim.lr=1e-4"])

Every key is checked against the dataclasses (an unknown key or a value of the wrong type is a
`ConfigError` naming the key). Cross-checks against the DeepSpeed config and the world size live in
validation.py. The run config owns the optimiser, schedule, batch sizes and clipping; the DeepSpeed
file owns ZeRO, precision and communication.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from vlmo_large.config import ModelConfig
from vlmo_large.errors import UserError
from vlmo_large.tasks.loss_weights import LossWeights
from vlmo_large.tasks.options import TaskOptions

DECAY_RULES = ("reference", "vlmo_large")  # optim.decay_rule: training/optimization.py


class ConfigError(UserError):
    """A configuration that cannot run; the message is one line naming the key or file."""


# Field metadata: this dict field holds a sparse set of the named dataclass's fields (overrides),
# checked key by key as a section of that dataclass would be
OVERRIDES_OF = "overrides_of"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1


@dataclass
class DataConfig:
    source: str = "shards"              # "shards" (webdataset) or "random" (tensors, for tests/benchmarks)
    shards: Union[str, list[str], None] = None   # brace pattern or list of tar files
    tokenizer: Optional[str] = None     # sentencepiece .model or WordPiece vocab.txt
    num_workers: int = 0
    mlm_prob: float = 0.15
    mim_ratio: float = 0.4
    augment: str = "spec"               # "spec", "light" or "none"
    random_distinct: int = 0            # source "random": cycle over this many batches (0: always new)


@dataclass
class BatchConfig:
    micro: Optional[int] = None         # samples per rank per forward; None: from the DeepSpeed file
    grad_accum: Optional[int] = None    # None: from the DeepSpeed file, else 1


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 turns clipping off
    decay_rule: str = "reference"       # which parameters get weight decay: "reference" (the reference
    #   VLMo's: all but biases and the norm/norm1/norm2/LayerNorm weights) or "vlmo_large" (also exempts
    #   expert norms, layer scales, logit scales, CLS/mask tokens, positions); training/optimization.py
    no_decay: list[str] = field(default_factory=list)  # more exemptions: glob patterns over parameter names
    head_lr_mult: float = 1.0           # lr multiplier of the task's new heads (Task.heads; the reference: 20 for VQA/NLVR2)
    layer_decay: float = 1.0            # layer-wise lr decay: block i at decay^(depth - i), embeddings decay^(depth + 1),
    #   final norm, pooler and heads 1.0; 1.0 turns it off


@dataclass
class ScheduleConfig:
    steps: Optional[int] = None         # optimizer steps; None: from epochs, else 1000 (resolve_run fills it in)
    epochs: Optional[float] = None      # passes over epoch_samples: steps = ceil(epochs * epoch_samples / global batch)
    epoch_samples: Optional[int] = None  # training samples in one epoch (set with epochs)
    warmup: Optional[int] = None        # warmup steps; None: warmup_ratio of the steps, else 100
    warmup_ratio: Optional[float] = None  # warmup as a fraction of the steps (the reference's 0.1)
    decay: str = "linear"               # "linear" or "cosine"
    min_lr_ratio: float = 0.0


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None           # None: <output_dir>/checkpoints
    every: int = 1000                   # steps between checkpoints (0: only at the end)
    keep: int = 3                       # complete checkpoints kept (the newest)
    export: bool = True                 # plain safetensors + model config JSON at the end


@dataclass
class EvalConfig:
    shards: Union[str, list[str], None] = None   # held-out shards of the stage's kind (loss terms, accuracies)
    batches: int = 20                   # held-out batches per evaluation
    retrieval_shards: Optional[str] = None       # held-out retrieval images (stage vl) ...
    retrieval_json: Optional[str] = None         # ... and their captions + gold mapping


@dataclass
class RunConfig:
    preset: str = "tiny"
    # ModelConfig fields that replace the preset's, e.g. {embed_dim: 512}: each key and value is
    # checked against ModelConfig as the other sections are (OVERRIDES_OF), only the given keys kept
    model: dict = field(default_factory=dict, metadata={OVERRIDES_OF: ModelConfig})
    stage: str = "vl"                   # the task: "mim" (1), "text_mlm" (2), "vl" (3), the fine-tuning tasks "vqa",
    #   "nlvr2", "retrieval", or a plugin's (vlmo_large/tasks/)
    task: TaskOptions = field(default_factory=TaskOptions)  # settings of the fine-tuning tasks (tasks/options.py)
    plugins: list[str] = field(default_factory=list)  # modules imported before the task is looked up (they register tasks)
    seed: int = 0
    output_dir: str = "runs/pretrain"
    init: Optional[str] = None          # weights to start from: an export / plain or sharded folder, a DeepSpeed
    #   checkpoint dir, a safetensors/torch file, or a reference VLMo file (training/initialization.py)
    resume: Optional[str] = None        # "auto" (newest complete checkpoint), a checkpoint dir, or None
    log_every: int = 10
    eval_every: int = 0                 # 0: no evaluation during training
    tracking_uri: Optional[str] = None  # None: <output_dir>/mlflow.db; http://...: a server; "none": off
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- building dataclasses from plain data, with type checks -------------------------------------
def _type_name(tp) -> str:
    if typing.get_origin(tp) is Union:  # Optional[float] -> "float or null"
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp, value, key: str):
    """Check `value` against the annotation `tp`; numbers written as strings ("1e-4") are parsed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _checked_section(cls, data: dict, prefix: str) -> dict:
    """`data`, a section of fields of the dataclass `cls`, with each key known and each value of its
    field's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known in this section: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        tp, overrides_of = hints[name], fields[name].metadata.get(OVERRIDES_OF)
        if overrides_of is not None:
            values[name] = _checked_section(overrides_of, value, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(tp):
            values[name] = build_dataclass(tp, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(tp, value, prefix + name)
    return values


def build_dataclass(cls, data: dict, prefix: str = ""):
    return cls(**_checked_section(cls, data, prefix))


# -- files and overrides --------------------------------------------------------------------------
def read_mapping(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def apply_override(data: dict, item: str) -> None:
    """`a.b.c=value`; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = value


def load_run_config(path: Optional[str], overrides: list[str] = ()) -> RunConfig:
    data = read_mapping(path) if path else {}
    for item in overrides:
        apply_override(data, item)
    return build_dataclass(RunConfig, data)
