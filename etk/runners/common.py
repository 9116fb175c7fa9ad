"""Shared runner plumbing: seeding, run directory, loggers (W&B offline by default), config logging."""

from __future__ import annotations

from etk.errors import ConfigError

import gc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the `hydra` key (for results files and loggers)."""
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(c), resolve=True)  # type: ignore[return-value]


_OUT_OVERRIDE: list[Path] = []


@contextmanager
def step_output(path: Path):
    """Inside the block, `output_dir()` is `path` (a study runs each step in its own folder)."""
    _OUT_OVERRIDE.append(Path(path))
    try:
        yield Path(path)
    finally:
        _OUT_OVERRIDE.pop()


def output_dir() -> Path:
    """The Hydra run (or sweep job) directory, or the current study step's folder."""
    from hydra.core.hydra_config import HydraConfig

    out = _OUT_OVERRIDE[-1] if _OUT_OVERRIDE else Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_logger(cfg: DictConfig):
    """`logger=wandb|csv|none`: a Lightning logger or None."""
    lcfg = cfg.get("logger")
    if not lcfg or not lcfg.get("_target_"):
        return None
    from hydra.utils import instantiate

    if "wandb" in lcfg._target_.lower():
        os.environ.setdefault("WANDB_SILENT", "true")
    logger = instantiate(lcfg)
    hp = plain_config(cfg)
    logger.log_hyperparams(hp)
    return logger


def finish_logger(logger) -> None:
    """End the W&B run (multirun jobs in one process must not merge) and flush other loggers."""
    if logger is None:
        return
    try:
        logger.finalize("success")
    finally:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()


def free_model() -> None:
    """Release model memory between jobs run in one process (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.trainer, resolve=True))  # type: ignore[arg-type]


def require_circuit(cfg: DictConfig):
    """(spec, Circuit) from `circuit=`: a shipped name, an `etk:` path or a circuit.json path."""
    from etk.circuits import load_circuit

    if not cfg.get("circuit"):
        raise ConfigError("this method needs circuit=<llama_7b|goat_7b|float_7b|path/to/circuit.json>")
    return str(cfg.circuit), load_circuit(str(cfg.circuit))


def data_config(cfg: DictConfig, n_examples: int) -> DictConfig:
    """The run's `data` block with another number of prompts."""
    from omegaconf import open_dict

    d = cfg.data.copy()
    with open_dict(d):
        d.n_examples = int(n_examples)
    return d


def emit(payload: dict[str, Any], schema: str, logger=None, metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Write the run's typed results.json and push scalar metrics to the logger."""
    from etk.artifacts import write_json

    write_json(output_dir() / "results.json", payload, schema)
    if logger is not None and metrics:
        logger.log_metrics(metrics)
    return payload
