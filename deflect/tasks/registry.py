"""The tasks by name: each task package registers its class (:func:`register_task`), and a run
builds its one task from the ``task`` config group (:func:`build_task`), so nothing outside the
task packages names a task."""

from __future__ import annotations

from collections.abc import Mapping

from deflect.tasks.base import Task

#: Registered task classes by :attr:`Task.name`.
TASKS: dict[str, type[Task]] = {}
#: The task of a run whose config has no ``task`` node (saved before tasks existed).
UNNAMED_RUN_TASK = "segmentation"


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` buildable as ``task.name: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name to register it under")
    if TASKS.get(cls.name, cls) is not cls:
        raise ValueError(f"two tasks are named {cls.name!r}: {TASKS[cls.name]} and {cls}")
    TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    """The task registered as ``name``.

    Raises:
        ValueError: no task has that name (the registered ones are named).
    """
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is no task; the tasks are {sorted(TASKS)}")
    return TASKS[name]


def _name_of_target(target: str) -> str:
    """The registered name of the class a saved config's ``task._target_`` names (configs
    written before tasks had names: ``deflect.tasks.SegmentationTask``)."""
    class_name = target.rsplit(".", 1)[-1]
    for name, cls in TASKS.items():
        if cls.__name__ == class_name:
            return name
    raise ValueError(f"task._target_={target!r} names no task; the tasks are {sorted(TASKS)}")


def build_task(node: Mapping | None) -> Task:
    """The task a ``task`` config node (a plain mapping: ``name`` and the task's options)
    describes; ``None`` for a run saved before tasks existed."""
    if node is None:
        return task_class(UNNAMED_RUN_TASK)()
    options = dict(node)
    name = options.pop("name", None)
    target = options.pop("_target_", None)
    if name is None:
        if target is None:
            raise ValueError(f"the task config {dict(node)} has no name; e.g. task.name=...")
        name = _name_of_target(str(target))
    return task_class(str(name))(**options)
