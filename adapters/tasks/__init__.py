"""Tasks are plugins: everything that differs between classification, regression, ... lives here.

`get(name)` returns the registered task class; nothing outside this package branches on a task's
name. Adding a task is one module with a `Task` subclass plus one `register` line below.
"""

from __future__ import annotations

from loradock.adapters.tasks.base import Task, TaskStateError
from loradock.adapters.tasks.classification import Classification
from loradock.adapters.tasks.generation import Generation
from loradock.adapters.tasks.multilabel import MultiLabel
from loradock.adapters.tasks.regression import Regression

_REGISTRY: dict[str, type[Task]] = {}


class UnknownTask(ValueError):
    """A task name no registered plugin answers to."""


def register(task: type[Task]) -> type[Task]:
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def names() -> list[str]:
    """Registered task names, in registration order (the first is the default)."""
    return list(_REGISTRY)


def get(name: str) -> type[Task]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTask(f"unknown task {name!r}; this server knows {names()}") from None


def from_meta(meta: dict) -> Task:
    """The task state of a stored version's loradock.json (UnknownTask / TaskStateError)."""
    return get(str(meta.get("task"))).from_meta(meta)


register(Classification)
register(Regression)
register(MultiLabel)
register(Generation)


def for_base(kind: str) -> list[str]:
    """Names of the tasks a base of this kind (`BaseModel.kind`) serves, the default first."""
    return [name for name, task in _REGISTRY.items() if task.base_kind == kind]


__all__ = [
    "Classification",
    "Generation",
    "MultiLabel",
    "Regression",
    "Task",
    "TaskStateError",
    "UnknownTask",
    "for_base",
    "from_meta",
    "get",
    "names",
    "register",
]
