"""Tasks: the `task=` config group's names. One task today — entity tracking in boxes, the paper's — whose prompts,
roles, circuit groups and counterfactuals are defined in `etk/data` and read by every method; a run of any other
name is refused before a model loads (it used to run boxes silently under another key)."""

from __future__ import annotations

from etk.errors import ConfigError

TASKS: dict[str, str] = {
    "entity_tracking": "entity tracking in boxes: 'The apple is in Box F, ... Box Q contains the' -> the object",
}


def check_task(name: str) -> str:
    """`name` if it is a known task, else a ConfigError listing the tasks."""
    if name not in TASKS:
        raise ConfigError(f"task.name = {name!r}: unknown task; tasks: "
                          + "; ".join(f"{k} ({v})" for k, v in TASKS.items()) + " — choose one with task=<name>")
    return name
