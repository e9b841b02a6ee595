"""Turn a run's nested configuration into MLflow params: flat "a.b.c" keys, string values, within limits.

MLflow rejects keys over 250 characters and values over 6000, and a run's param can never change.
Long values are cut here (with a marker), so the full setup also goes to an artifact
(`run_setup.json`, see `Tracker.log_run_setup`).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

# mlflow.utils.validation's limits (MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH) in mlflow 3.x.
MAX_KEY_LENGTH = 250
MAX_VALUE_LENGTH = 6000
TRUNCATION_MARK = "...[truncated]"


def to_plain(value: Any) -> Any:
    """Dataclasses, enums, paths, tuples and tensors -> JSON-friendly dicts, lists and scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors, numpy scalars
        return value.tolist()
    return repr(value)


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists stay one JSON value (a list is one setting)."""
    flat: dict[str, str] = {}
    plain = to_plain(config)
    if not isinstance(plain, dict):
        plain = {"value": plain}
    for key, value in plain.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[_fit_key(name)] = _fit_value(value)
    return flat


def _fit_key(key: str) -> str:
    # Keep the tail: the leaf name is the informative part of a long dotted key.
    return key if len(key) <= MAX_KEY_LENGTH else "~" + key[-(MAX_KEY_LENGTH - 1):]


def _fit_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_VALUE_LENGTH:
        text = text[:MAX_VALUE_LENGTH - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return text


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """`git rev-parse HEAD` of the source tree (this package's checkout), or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def run_setup(config: Any = None, ds_config: Any = None, preset: Any = None, layout: Any = None,
              commit: str | None = None) -> dict[str, Any]:
    """The nested record of what a run is: resolved config, DeepSpeed config, preset, parallel layout
    (e.g. {"tp": 2, "pp": 1, "dp": 4, "zero": 1}) and the git commit. None entries are left out."""
    setup = {"config": config, "ds_config": ds_config, "preset": preset, "layout": layout,
             "git_commit": commit if commit is not None else git_commit()}
    return {k: to_plain(v) for k, v in setup.items() if v is not None}
