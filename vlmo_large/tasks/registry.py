"""Every task by name, in one place: the built-in ones (BUILT_IN, imported on the first look-up) and
those a user's module registers (run config `plugins`, imported before the task is looked up)."""
from __future__ import annotations

import importlib

from vlmo_large.errors import UserError
from vlmo_large.tasks.base import DATA_KINDS, Task

BUILT_IN = ("vlmo_large.tasks.mim", "vlmo_large.tasks.text_mlm", "vlmo_large.tasks.vl", "vlmo_large.tasks.vqa",
            "vlmo_large.tasks.nlvr2", "vlmo_large.tasks.retrieval")
_TASKS: dict[str, Task] = {}


def _load_built_in() -> None:
    for module in BUILT_IN:
        importlib.import_module(module)  # each registers its task


class UnknownTask(UserError):
    """A task name nobody registered."""


def register(task):
    """Register a Task instance (or a Task subclass, instantiated) under its name; returns what it
    was given, so it works as a class decorator. A name registered twice is an error unless it is
    the same class again (a module imported twice)."""
    instance = task() if isinstance(task, type) else task
    if not isinstance(instance, Task) or not instance.name:
        raise TypeError(f"register() takes a Task with a name, got {task!r}")
    if instance.data_kind not in DATA_KINDS:
        raise ValueError(f"task '{instance.name}': data_kind '{instance.data_kind}' must be one of {DATA_KINDS}")
    known = _TASKS.get(instance.name)
    if known is not None and type(known).__qualname__ != type(instance).__qualname__:
        raise ValueError(f"task '{instance.name}' is already registered by {type(known).__module__}")
    _TASKS[instance.name] = instance
    return task


def get_task(name) -> Task:
    """The task registered as `name` (a Task is returned as it is)."""
    if isinstance(name, Task):
        return name
    _load_built_in()
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTask(f"unknown task '{name}'; known tasks: {', '.join(task_names())}") from None


def task_names() -> tuple[str, ...]:
    """The built-in tasks first (BUILT_IN's order), then the others in registration order."""
    _load_built_in()
    rank = {module: i for i, module in enumerate(BUILT_IN)}
    ordered = sorted(_TASKS.values(), key=lambda task: rank.get(type(task).__module__, len(BUILT_IN)))
    return tuple(task.name for task in ordered)


def import_plugins(modules, key: str = "plugins") -> None:
    """Import each named module (it registers its tasks); a module that fails to import is a
    UserError naming it and the cause."""
    for module in modules or ():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 (any failure of a user's module is theirs to fix)
            raise UserError(f"{key}: cannot import '{module}': {type(exc).__name__}: {exc}") from exc
