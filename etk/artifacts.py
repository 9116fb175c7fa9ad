"""Typed result artefacts: JSON documents with a schema tag, written atomically into the run directory.

Results never contain NaN or Infinity: an undefined number is written as null (the producer records why, in a
`reason` field), so every file is valid JSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from etk.errors import DataError


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed run (only rank 0 writes artefacts)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_tensor(obj: Any, path: str | Path) -> Path:
    """torch.save on rank 0, atomically."""
    import torch

    path = Path(path)
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temp file + rename): a crash mid-write never leaves a truncated file. In a
    distributed run only rank 0 writes (every rank computed the same gathered results)."""
    path = Path(path)
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def finite(o: Any) -> Any:
    """A copy of a JSON-able structure with NaN / +-Infinity floats replaced by None (tensors/arrays as lists)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    if hasattr(o, "tolist"):
        return finite(o.tolist())
    return o


def named(values: Any, *axes: str) -> dict[str, Any]:
    """A tensor in a JSON record: `{"axes": [...], "shape": [...], "values": nested lists}` (NaN written as null).
    The one form of a tensor with named axes in results (score maps keep the paper's file schema, `save_score_map`)."""
    if len(axes) != len(values.shape):
        raise ValueError(f"{len(axes)} axis names {axes} for a tensor of shape {tuple(values.shape)}")
    return {"axes": list(axes), "shape": list(values.shape), "values": values.tolist()}


def write_json(path: str | Path, payload: dict[str, Any], schema: str) -> Path:
    """Write `{"schema": schema, **payload}` atomically, with undefined numbers as null."""
    text = json.dumps(finite({"schema": schema, **payload}), indent=2, allow_nan=False, default=_default)
    return write_text(path, text)


def read_json(path: str | Path, schema: str | None = None) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): rerun the job that wrote it") from None
    if schema is not None and doc.get("schema") != schema:
        raise DataError(f"{path}: expected schema {schema!r}, found {doc.get('schema')!r}")
    return doc


def _default(o):
    if hasattr(o, "tolist"):
        return finite(o.tolist())
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
