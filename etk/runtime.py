"""What every run needs at run time: its output directory (a study's step folder inside a study), its logger (W&B
offline by default) and resources, the resolved config it records, `emit` (the typed results.json plus the logger),
the DDP barrier, and Hydra's compose API and override grammar for runs composed in code (the study, the Python API)."""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from etk.results import Result


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


_STUDY: list[str] = []  # non-empty inside a study (`inside_study`): its jobs print no run line, the study one per job
_RUNS: list[tuple[float, DictConfig]] = []  # (start time, config) of the runs in progress (a study nests them)


@contextmanager
def run_logger(cfg: DictConfig):
    """The run's logger (`logger=wandb|csv|none`, None for none) for the block; finished (W&B run ended) on exit,
    also on errors. The block's wall time and peak memory go into the run's results (`emit`)."""
    import time

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _RUNS.append((time.time(), cfg))
    saved_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision(cfg))
    announce(cfg)
    logger = build_logger(cfg)
    try:
        yield logger
    finally:
        _RUNS.pop()
        torch.set_float32_matmul_precision(saved_precision)
        finish_logger(logger)


MATMUL_PRECISIONS = ("highest", "high", "medium")


def matmul_precision(cfg: DictConfig) -> str:
    """The run's fp32 matmul precision (`model.matmul_precision`; a pair's members': the lower of the two):
    `highest` (default: exact fp32), `high` (TF32 on Ampere+ GPUs: ~6x faster GEMMs; see the README for when it is
    safe: `python benchmarks/precision.py --tf32`) or `medium` (bf16 inputs). CPUs ignore it."""
    found = [str(m.get("matmul_precision") or "highest")
             for m in ([cfg.get("model")] + [cfg.get("pair", {}).get(k) for k in ("base", "finetuned")]) if m]
    bad = [p for p in found if p not in MATMUL_PRECISIONS]
    if bad:
        from etk.errors import ConfigError

        raise ConfigError(f"model.matmul_precision={bad[0]!r} is not one of {', '.join(MATMUL_PRECISIONS)}: use highest "
                          "(exact fp32, the default), high (TF32 on GPUs) or medium")
    return max(found, key=MATMUL_PRECISIONS.index) if found else "highest"


def run_device(cfg: DictConfig | None) -> str:
    """The device the run's Lightning loops use: cuda when one is there and `trainer.accelerator` allows it."""
    accel = (cfg.get("trainer") or {}).get("accelerator", "auto") if cfg is not None else "auto"
    return "cuda" if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else "cpu"


def announce(cfg: DictConfig) -> None:
    """One line per run (not per job of a study, which prints its own progress): method, model, device, dtype and
    matmul precision."""
    from etk.models.loading import resolve_dtype

    if len(_RUNS) > 1 or _STUDY or int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) != 0:
        return
    dev = run_device(cfg)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    model = cfg.get("model") or {}
    method = (cfg.get("method") or {}).get("name", cfg.get("entry", "run"))
    who = (cfg.get("pair") or {}).get("name") if method in ("study", "study_paper", "cmap", "model_diff") else model.get("name")
    print(f"[etk] {method} on {who}: device {name}, dtype {str(resolve_dtype(model.get('dtype'))).replace('torch.', '')}, "
          f"matmul {matmul_precision(cfg)}", flush=True)


def say(line: str, console: bool = True) -> None:
    """A line for the user: printed (unless `console=False`) and written to the job log (`<run dir>/run.log`)."""
    import logging

    if console:
        print(line, flush=True)
    logging.getLogger("etk").info(line)


@contextmanager
def inside_study(name: str):
    """Inside the block, runs are a study's jobs: they print no run line of their own (`announce`)."""
    _STUDY.append(name)
    try:
        yield
    finally:
        _STUDY.pop()


def resources(cfg: DictConfig | None = None) -> dict[str, Any]:
    """What the current run used: wall time since its start, peak memory (process peak RSS on CPU; CUDA max
    allocated on GPU), device, dtype, world size."""
    import resource
    import time

    from etk.metrics import world_size
    from etk.models.loading import resolve_dtype

    start, run_cfg = _RUNS[-1] if _RUNS else (None, cfg)
    cfg = cfg or run_cfg
    cuda = torch.cuda.is_available() and (cfg is None or cfg.get("trainer", {}).get("accelerator") in ("auto", "gpu", "cuda"))
    out: dict[str, Any] = {"wall_s": round(time.time() - start, 1) if start else None,
                           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                           "device": "cuda" if cuda else "cpu", "world_size": world_size()}
    if cuda:
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    model = (cfg.get("model") if cfg is not None else None) or {}
    if model.get("dtype") is not None:
        out["dtype"] = str(resolve_dtype(model.get("dtype"))).replace("torch.", "")
    return out


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


def barrier() -> None:
    """Wait for every process of a distributed run (a no-op with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def free_model() -> None:
    """Release model memory between jobs run in one process (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.trainer, resolve=True))  # type: ignore[arg-type]


def make_trainer(cfg: DictConfig, label: str, **overrides: Any):
    """A Lightning Trainer from `cfg.trainer` plus `overrides` (no logger unless one is passed), without Lightning's
    banners and tips; its progress bar, when on, names what it iterates (`label`, e.g. "path patching, value_fetcher:
    prompt batches")."""
    import lightning as L

    quiet_dependencies()
    kw: dict[str, Any] = {**trainer_kwargs(cfg), "logger": False, **overrides}
    kw["logger"] = kw["logger"] or False
    if kw.get("enable_progress_bar", True):
        kw["callbacks"] = [*(kw.get("callbacks") or []), labelled_progress_bar(label)]
    return L.Trainer(**kw)


def labelled_progress_bar(label: str):
    """A tqdm progress bar whose description is `label` (fit: `label, epoch N`; validation: `label, validation`)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class LabelledProgressBar(TQDMProgressBar):
        def on_train_epoch_start(self, trainer, *args: Any) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description(f"{label}, epoch {trainer.current_epoch}")

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
            self.val_progress_bar.set_description(f"{label}, validation")

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
            self.test_progress_bar.set_description(f"{label}, test")

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
            self.predict_progress_bar.set_description(label)

    return LabelledProgressBar()


# Warnings from dependencies that say nothing about the run (message regexes, matched from the start).
KNOWN_NOISE = (
    r".*does not have many workers",                     # etk's loaders hold pre-tokenised batches: workers add nothing
    r".*isinstance\(treespec, LeafSpec\)",              # lightning's pytree shim on torch >= 2.9
    r".*predict returned None",                          # etk's predict steps accumulate metrics and return None
    r".*You are using a CUDA device .* that has Tensor Cores",  # precision is chosen per run (`model.matmul_precision`)
    r".*The number of training batches .* is smaller than the logging interval",
    r".*Checkpoint directory .* exists and is not empty",  # DCM reruns overwrite their own best.ckpt
    r".*You are using a custom batch sampler",            # etk's RankSlicedBatches yields every index (tested)
    r".*Found \d+ module\(s\) in eval mode",              # the frozen model is in eval mode on purpose
)


def quiet_dependencies() -> None:
    """Drop Lightning's banners ("GPU available", "TPU available", "💡 Tip") and the known warnings above; each
    run prints one line of its own with device and precision (`announce`). Idempotent."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: each run prints its own line


def data_config(cfg: DictConfig, n_examples: int) -> DictConfig:
    """The run's `data` block with another number of prompts."""
    from omegaconf import open_dict

    d = cfg.data.copy()
    with open_dict(d):
        d.n_examples = int(n_examples)
    return d


def emit(result: "Result", logger=None) -> "Result":
    """Write the run's typed results.json (with the run's `resources`) and send its headline numbers, tables and
    figures to the logger; returns the result."""
    result.resources = resources()
    result.save(output_dir())
    result.log(logger)
    return result


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """A primary config (`patching`, `dcm`, `finetune`) composed by Hydra from the packaged configs, exactly as
    the command line would (inside a running Hydra app its search path is used)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=overrides)
    with initialize_config_module("etk.conf", version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def hydra_value(v: Any) -> str:
    """A Python value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    s = str(v)
    return s if s and all(c.isalnum() or c in "_-./:" for c in s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_overrides(prefix: str, block: Any) -> list[str]:
    """`{a: 1, b: {c: [2, 3]}}` under `prefix` -> ["prefix.a=1", "prefix.b.c=[2,3]"]."""
    node = OmegaConf.to_container(block, resolve=True) if not isinstance(block, dict) else block
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += to_overrides(f"{prefix}.{k}", v)
        else:
            out.append(f"{prefix}.{k}={hydra_value(v)}")
    return out
