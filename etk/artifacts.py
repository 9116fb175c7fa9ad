"""Typed result artefacts: JSON documents with a schema tag, written atomically into the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, payload: dict[str, Any], schema: str) -> Path:
    """Write `{"schema": schema, **payload}`; a crash mid-write never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"schema": schema, **payload}, indent=2, default=_default))
    os.replace(tmp, path)
    return path


def read_json(path: str | Path, schema: str | None = None) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if schema is not None and doc.get("schema") != schema:
        raise ValueError(f"{path}: expected schema {schema!r}, found {doc.get('schema')!r}")
    return doc


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
