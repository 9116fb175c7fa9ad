"""Tasks: the registry of `etk/tasks/<name>/` folders, selected by the `task=` config group (`task.name`).

Every method reads its task through `task_of(cfg)` and never imports a task's module; a task registers with one line
below (or, from user code and tests, with `register(task)`). Registering a task adds its role names to the shared
role namespace (`etk.data.roles`), after those of the tasks registered before it."""

from __future__ import annotations

from typing import Any

from etk.data.roles import register_roles
from etk.errors import ConfigError
from etk.tasks.base import Desideratum, Group, Pair, Stage, Task

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make `task` selectable as `task=<task.name>`; its groups must not reuse another task's group names."""
    for other in TASKS.values():
        clash = {g.name for g in task.groups} & {g.name for g in other.groups} if other.name != task.name else set()
        if clash:
            raise ConfigError(f"task {task.name!r}: groups {sorted(clash)} are already groups of task {other.name!r}")
    TASKS[task.name] = task
    register_roles(task.roles)
    return task


def task_named(name: str) -> Task:
    """The registered task `name`, else a ConfigError listing the tasks."""
    if name not in TASKS:
        raise ConfigError(f"task.name = {name!r}: unknown task; tasks: "
                          + "; ".join(f"{k} ({v.description})" for k, v in TASKS.items()) + " — choose one with task=<name>")
    return TASKS[name]


def task_of(cfg: Any) -> Task:
    """The task a composed config selects (`task.name`; entity tracking when the config has no task)."""
    node = cfg.get("task") if cfg is not None else None
    name = node.get("name") if hasattr(node, "get") else node
    return task_named(str(name or "entity_tracking")).with_config(node)


def group_role(key: str) -> str:
    """The position role of a circuit key: a group of any registered task, or the key itself (a role)."""
    for t in TASKS.values():
        if key in t.group_role:
            return t.group_role[key]
    return key


def task_with_groups(keys) -> Task | None:
    """The registered task whose groups include every key of `keys` that is a group of some task (None if none)."""
    groups = all_groups()
    keys = [k for k in keys if k in groups]
    return next((t for t in TASKS.values() if keys and all(k in t.group_role for k in keys)), None)


def collapsed_roles() -> tuple[str, ...]:
    """Every registered task's collapsed token roles (`objects[k]` -> `objects`), in registration order, then any
    other role of the namespace (a task registered once and since removed keeps its role names)."""
    from etk.data.roles import ROLE_VOCAB

    ordered = [r for t in TASKS.values() for r in t.collapsed_roles]
    return tuple(dict.fromkeys([*ordered, *(r.split("[")[0] for r in ROLE_VOCAB)]))


def collapsed_index():
    """[len(ROLE_VOCAB)] long: the `collapsed_roles()` row of every token role id (`objects[3]` -> `objects`)."""
    import torch

    from etk.data.roles import ROLE_VOCAB

    rows = collapsed_roles()
    return torch.tensor([rows.index(r.split("[")[0]) for r in ROLE_VOCAB], dtype=torch.long)


def check_groups_of(task: Task, keys, what: str) -> None:
    """A ConfigError when `keys` (a circuit's entries) name groups of another task than the run's."""
    groups = all_groups()
    other = [k for k in keys if k in groups and k not in task.group_role]
    if other:
        owner = task_with_groups(other)
        raise ConfigError(f"{what} has the groups {other}"
                          + (f" of task {owner.name!r}" if owner else "") + f", but the run's task is {task.name!r} "
                          f"(groups {', '.join(task.group_names)}): give a circuit found on this task (e.g. "
                          f"circuit.path=<a task={task.name} path-patching or minimality run>/circuit.json) or set "
                          f"task={owner.name if owner else '<its task>'}")


def all_groups() -> dict[str, str]:
    """Every registered task's groups: name -> role."""
    return {g: r for t in TASKS.values() for g, r in t.group_role.items()}


# the registry: one line per task folder
from etk.tasks.entity_tracking import TASK as _ENTITY_TRACKING  # noqa: E402
from etk.tasks.ioi import TASK as _IOI  # noqa: E402

register(_ENTITY_TRACKING)
register(_IOI)

__all__ = ["TASKS", "Desideratum", "Group", "Pair", "Stage", "Task", "all_groups", "check_groups_of",
           "collapsed_index", "collapsed_roles", "group_role", "register", "task_named", "task_of", "task_with_groups"]
