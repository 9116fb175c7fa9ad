"""Dispatch of `run_patching.py` by `method.name`."""

from __future__ import annotations

from etk.errors import ConfigError

from omegaconf import DictConfig

from etk.runners.circuit_eval import (run_circuit_search, run_completeness, run_faithfulness, run_faithfulness_curve, run_minimality,
                                      run_overlap)
from etk.runners.cmap import run_activation_patching, run_cmap
from etk.runners.eval import run_eval
from etk.runners.knockout import run_knockout
from etk.runners.path_patching import run_path_patching
from etk.runners.study import run_study

METHODS = {
    "eval": run_eval,
    "path_patching": run_path_patching,
    "faithfulness": run_faithfulness,
    "faithfulness_curve": run_faithfulness_curve,
    "circuit_search": run_circuit_search,
    "completeness": run_completeness,
    "minimality": run_minimality,
    "overlap": run_overlap,
    "knockout": run_knockout,
    "cmap": run_cmap,
    "activation_patching": run_activation_patching,
    "study": run_study,
}


def run(cfg: DictConfig):
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](cfg)
