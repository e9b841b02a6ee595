"""The DeepSpeed JSON checked before training: what DeepSpeed ignores silently (a misspelt key such
as `zero_optimisation` runs without ZeRO) or reports only once training starts, with a traceback.

The keys DeepSpeed knows are taken from DeepSpeed itself: its config parser is run on an empty
config that records every top-level key it asks for, and ZeRO keys are DeepSpeedZeroConfig's
fields and aliases. Each problem is a ConfigError with one line naming the file and the key.
"""
from __future__ import annotations

import copy
import difflib
import functools
import logging

import torch

from vlmo_large.training.run_config import ConfigError

# Top-level keys DeepSpeed reads outside its config parser: these two in deepspeed/__init__.py
# (no constant names them); vocabulary_size and autotuning are added from DeepSpeed's constants.
_READ_ELSEWHERE = ("sequence_parallel_size", "data_parallel_size")


class _RecordingDict(dict):
    """An empty mapping that remembers every key it is asked for."""

    def __init__(self):
        super().__init__()
        self.asked: set[str] = set()

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def keys(self):  # `key in config.keys()` is another way DeepSpeed asks
        return _RecordingKeys(self)


class _RecordingKeys:
    def __init__(self, owner: _RecordingDict):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(dict.keys(self.owner))


def _import_deepspeed_config():
    """deepspeed.runtime.config, without torch's "No CUDA runtime" warning on a CPU machine, which
    would precede the one-line error of a refused config."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        import deepspeed.runtime.config
    finally:
        cpp_logger.setLevel(level)
    return deepspeed.runtime.config


def _parse(ds: dict) -> None:
    """DeepSpeed's config parser alone (no world size, no batch arithmetic: validation.py owns those)."""
    DeepSpeedConfig = _import_deepspeed_config().DeepSpeedConfig

    parser = DeepSpeedConfig.__new__(DeepSpeedConfig)
    parser.global_rank, parser.world_size, parser._param_dict = 0, 1, ds
    parser._initialize_params(ds)


@functools.lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    from deepspeed.autotuning.constants import AUTOTUNING
    from deepspeed.runtime.constants import VOCABULARY_SIZE

    recording = _RecordingDict()
    _parse(recording)
    return frozenset(recording.asked | {VOCABULARY_SIZE, AUTOTUNING, *_READ_ELSEWHERE})


def known_zero_keys() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return set(fields) | {f.alias for f in fields.values() if f.alias}


def _unknown_key(source: str, key: str, known, section: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{section}{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: '{section}{key}' is not a DeepSpeed config key{hint}")


def _validation_message(exc) -> str:
    """The first problem of a pydantic ValidationError, on one line."""
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    return f"{loc}: {first['msg']} (got {first.get('input')!r})"


def _enabled(ds: dict, section: str) -> bool:
    value = ds.get(section)
    return isinstance(value, dict) and value.get("enabled") is True


def check_deepspeed_config(ds: dict, source: str = "the DeepSpeed config") -> None:
    """Raise a ConfigError naming the first key of `ds` (read from `source`) that cannot train here."""
    import pydantic
    DeepSpeedConfigError = _import_deepspeed_config().DeepSpeedConfigError
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = known_top_level_keys()
    for key in ds:
        if key not in known:
            raise _unknown_key(source, key, known)
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{source}: zero_optimization must be a mapping such as {{\"stage\": 1}}, got {zero!r}")
    zero_keys = known_zero_keys()
    for key in zero:
        if key not in zero_keys:
            raise _unknown_key(source, key, zero_keys, "zero_optimization.")
    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as exc:
        if exc.errors()[0]["loc"] == ("stage",):
            raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, "
                              f"got {zero['stage']!r}") from exc
        raise ConfigError(f"{source}: zero_optimization.{_validation_message(exc)}") from exc
    try:  # every other section as DeepSpeed will read it at initialize, where it would be a traceback
        _parse(copy.deepcopy(ds))
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{source}: {exc.title}: {_validation_message(exc)}") from exc
    except (DeepSpeedConfigError, ValueError, TypeError, KeyError, AssertionError) as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if _enabled(ds, "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"{source}: fp16.enabled is true but this machine has no GPU; DeepSpeed trains on "
                          "a CPU in fp32 or bf16: set fp16.enabled to false (and bf16.enabled to true for bf16)")
    if _enabled(ds, "bf16") and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{source}: bf16.enabled is true but this GPU has no bf16 support: "
                          "set bf16.enabled to false (and fp16.enabled to true for half precision)")
