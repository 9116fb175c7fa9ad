"""`method=knockout`: task accuracy when attention edges are blocked from a start layer on (paper §7), for every
start layer, with 95% Wilson intervals; `results.json` (schema `etk.knockout/v1`) and `knockout.png`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from etk.data.datasets import prompt_loader
from etk.methods.knockout.module import KnockoutModule
from etk.metrics import accuracy_ci
from etk.models.loading import load
from etk.report.plots import line_plot
from etk.results import KnockoutResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_device, run_logger
from etk.tasks import task_of

PLOT = "knockout.png"


def knockout_curves(module: KnockoutModule, correct: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """[K, N] correctness in `module.configs()` order -> (baseline summary, {edge: curve over start layers})."""
    cfgs = module.configs()
    rows = {c: accuracy_ci(correct[i]) for i, c in enumerate(cfgs)}
    baseline = rows[cfgs[0]]
    starts = module.start_layers()
    curves = {}
    for e in module.edges:
        pts = [rows[(e, s)] for s in starts]
        curves[e] = {"start_layer": starts, **{key: [p[key] for p in pts] for key in ("accuracy", "ci_low", "ci_high")}}
    return baseline, curves


def run_knockout(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    m = cfg.method
    task = task_of(cfg)
    edges = list(m.edges or task.knockout_edges)
    model = load(cfg.model, run_device(cfg))
    module = KnockoutModule(model.cfg, edges, None if m.get("start_layers") is None else list(m.start_layers),
                            int(m.rows_per_forward), int(m.random_seed), int(m.get("start_layers_every", 1)), model,
                            task.scalar_roles, bool(m.get("paper_compat", False)), bool(m.get("reference", False)))
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, "knockout: prompt batches", logger=logger)
        data_cfg = data_config(cfg, m.n_examples)
        tok = module.tokenizer
        loader = prompt_loader(task, tok, task.examples(data_cfg, tok), int(m.batch_size), cfg.data.padding_side)
        trainer.predict(module, loader, return_predictions=False)
        baseline, curves = knockout_curves(module, module.acc.per_example())
        starts = module.start_layers()
        for e, c in curves.items():
            print(f"[etk] knockout {e} on {cfg.model.name} (n={baseline['n']}, baseline {baseline['accuracy']:.3f}): "
                  "accuracy by start layer " + " ".join(f"{s}:{a:.2f}" for s, a in zip(starts, c["accuracy"])))
        title = f"attention knockout: {cfg.model.name}, {task.prompts_phrase(cfg.data)}, n={baseline['n']}"
        series = {e: c["accuracy"] for e, c in curves.items()}
        series["baseline (no knockout)"] = [baseline["accuracy"]] * len(starts)
        line_plot(starts, series, output_dir() / PLOT, title, "start layer s (edges blocked in layers >= s)",
                  "accuracy")
        if logger is not None:
            logger.log_metrics({"knockout/baseline": baseline["accuracy"]})
            for i, s in enumerate(starts):
                logger.log_metrics({f"knockout/{e}": c["accuracy"][i] for e, c in curves.items()}, step=s)
        payload = {"model": cfg.model.name, "n": baseline["n"], "n_layers": module.n_layers, "baseline": baseline,
                   "edges": curves, "plot": PLOT, "forwards": module.forwards, "config": plain_config(cfg)}
        return emit(KnockoutResult.from_payload(payload), logger)
