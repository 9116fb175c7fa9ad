"""Dispatch of `run_patching.py` by `method.name`."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.runners.eval import run_eval
from etk.runners.path_patching import run_path_patching

METHODS = {"eval": run_eval, "path_patching": run_path_patching}


def run(cfg: DictConfig):
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](cfg)
