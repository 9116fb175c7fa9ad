"""`method=eval`: accuracy of a model on generated boxes prompts, with a 95% interval, as a predict loop."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, open_dict

from etk.data.datasets import prompt_loader, task_examples
from etk.methods.eval.module import AccuracyModule
from etk.models.loading import load
from etk.results import EvalResult
from etk.runtime import data_config, emit, plain_config, run_logger, trainer_kwargs


def evaluate(module: AccuracyModule, data_cfg: DictConfig, trainer: L.Trainer) -> dict[str, Any]:
    """Accuracy of the module's model on the dataset that `data_cfg` describes."""
    examples = task_examples(data_cfg, module.tokenizer)
    loader = prompt_loader(module.tokenizer, examples, data_cfg.batch_size, data_cfg.padding_side)
    trainer.predict(module, loader, return_predictions=False)
    return module.acc.compute()


def evaluate_box_counts(module: AccuracyModule, data_cfg: DictConfig, counts: list[int], trainer: L.Trainer,
                        label: str, logger=None) -> list[dict[str, Any]]:
    """Accuracy with a 95% interval at each box count (the model is loaded once); prints one line each."""
    rows = []
    for n in counts:
        d = data_cfg.copy()
        with open_dict(d):
            d.n_boxes = int(n)
        res = {"n_boxes": int(n), **evaluate(module, d, trainer)}
        rows.append(res)
        print(f"[etk] {label} n_boxes={n}: accuracy={res['accuracy']:.3f} "
              f"(95% CI {res['ci_low']:.3f}-{res['ci_high']:.3f}, n={res['n']})")
        if logger is not None:
            logger.log_metrics({f"accuracy/{n}_boxes": res["accuracy"], f"ci_low/{n}_boxes": res["ci_low"],
                                f"ci_high/{n}_boxes": res["ci_high"]})
    return rows


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    model = load(cfg.model)
    module = AccuracyModule(model.cfg, model)
    with run_logger(cfg) as logger:
        trainer = L.Trainer(**trainer_kwargs(cfg), logger=logger or False)
        counts = list(cfg.method.get("box_counts") or [cfg.data.n_boxes])
        n = cfg.method.get("n_examples")
        data = data_config(cfg, n) if n else cfg.data
        rows = evaluate_box_counts(module, data, counts, trainer, cfg.model.name, logger)
        main = rows[-1] if len(rows) == 1 else next((r for r in rows if r["n_boxes"] == cfg.data.n_boxes), rows[-1])
        payload = {"model": cfg.model.name, **main, "by_n_boxes": rows, "config": plain_config(cfg)}
        return emit(EvalResult.from_payload(payload), logger)
