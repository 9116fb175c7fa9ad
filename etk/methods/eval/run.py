"""`method=eval`: accuracy of a model on the task's prompts, with a 95% interval, as a predict loop (and the logit
difference answer - distractor where the task names one: IOI's IO - S)."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

from etk.data.datasets import prompt_loader
from etk.methods.eval.module import AccuracyModule
from etk.models.loading import load
from etk.results import EvalResult
from etk.runtime import data_config, emit, make_trainer, plain_config, run_device, run_logger
from etk.tasks import Task, task_of


def evaluate(task: Task, module: AccuracyModule, data_cfg: DictConfig, trainer: L.Trainer) -> dict[str, Any]:
    """Accuracy of the module's model on the task's prompts that `data_cfg` describes (+ `logit_diff` when defined)."""
    examples = task.examples(data_cfg, module.tokenizer)
    loader = prompt_loader(task, module.tokenizer, examples, data_cfg.batch_size, data_cfg.padding_side)
    trainer.predict(module, loader, return_predictions=False)
    out = dict(module.acc.compute())
    ld = module.logit_diff.compute()
    if ld["n"]:
        out["logit_diff"] = ld
    return out


def evaluate_sets(task: Task, module: AccuracyModule, data_cfg: DictConfig, method_cfg: DictConfig,
                  trainer: L.Trainer, label: str, logger=None) -> list[dict[str, Any]]:
    """Accuracy with a 95% interval on each of the task's evaluation sets (entity tracking: one per box count; the
    model is loaded once); prints one line each."""
    rows = []
    for labels, d in task.eval_sets(data_cfg, method_cfg):
        res = {**labels, **evaluate(task, module, d, trainer)}
        rows.append(res)
        tag = " ".join(f"{k}={v}" for k, v in labels.items())
        ld = res.get("logit_diff")
        print(f"[etk] {label} {tag or task.name}: accuracy={res['accuracy']:.3f} "
              f"(95% CI {res['ci_low']:.3f}-{res['ci_high']:.3f}, n={res['n']})"
              + (f", logit difference {ld['mean']:.3f} (95% CI {ld['ci_low']:.3f}-{ld['ci_high']:.3f})" if ld else ""))
        if logger is not None:
            suffix = "".join(f"/{v}_boxes" if k == "n_boxes" else f"/{k}={v}" for k, v in labels.items())
            logger.log_metrics({f"accuracy{suffix}": res["accuracy"], f"ci_low{suffix}": res["ci_low"],
                                f"ci_high{suffix}": res["ci_high"],
                                **({f"logit_diff{suffix}": ld["mean"]} if ld else {})})
    return rows


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    task = task_of(cfg)
    model = load(cfg.model, run_device(cfg))
    module = AccuracyModule(model.cfg, model)
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, "eval: prompt batches", logger=logger)
        n = cfg.method.get("n_examples")
        data = data_config(cfg, n) if n else cfg.data
        rows = evaluate_sets(task, module, data, cfg.method, trainer, cfg.model.name, logger)
        main = rows[-1] if len(rows) == 1 else next((r for r in rows if r.get("n_boxes") == cfg.data.get("n_boxes")),
                                                    rows[-1])
        payload = {"model": cfg.model.name, **main, "config": plain_config(cfg)}
        if "n_boxes" in main:
            payload["by_n_boxes"] = rows
        return emit(EvalResult.from_payload(payload), logger)
