"""Dispatch of `run_patching.py` / `etk-patching` by `method.name`, through the method registry."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.methods.registry import run as run_method


def run(cfg: DictConfig):
    return run_method(cfg)
