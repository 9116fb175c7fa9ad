"""The mean-ablation evaluator every circuit method calls: loads the model, computes the per-position means on the
ablation set (SPEC §3.1), and evaluates batches of ablations on the evaluation prompts, one predict loop per call."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from etk.circuits import Circuit
from etk.data.datasets import prompt_loader
from etk.interventions.components import check_heads
from etk.methods.mean_ablation.module import AblationEval, MeansModule
from etk.models.loading import LoadedModel, load
from etk.runtime import data_config, make_trainer, run_device
from etk.tasks import task_of


class Evaluator:
    """Loads the model, computes the per-position means on the task's ablation set, and evaluates ablations on the
    task's evaluation prompts (`data` with `n_examples`, default `method.n_examples`). `vital`: the task's vital
    roles, which group circuits and all-heads references are built on."""

    def __init__(self, cfg: DictConfig, circuit: Circuit | None = None, n_examples: int | None = None,
                 model: LoadedModel | None = None):
        m = cfg.method
        model = model or load(cfg.model, run_device(cfg))
        self.dims = model.arch.dims
        for heads in (circuit.groups.values() if circuit is not None else []):
            check_heads(heads, self.dims)
        tok = model.tokenizer
        self.trainer = make_trainer(cfg, "mean ablation: prompt batches")
        self.task = task_of(cfg)
        self.vital = self.task.vital_roles
        abl = self.task.ablation_examples(cfg, tok)
        means = MeansModule(model.cfg, model)
        self.trainer.predict(means, prompt_loader(self.task, tok, abl, int(m.batch_size), cfg.data.padding_side),
                             return_predictions=False)
        self.module = AblationEval(model.cfg, means.means(), int(m.ablations_per_forward),
                                   int(m.get("vital_rows_per_forward", 2048)), bool(m.get("vital_fast_path", True)),
                                   model, active_fast_path=not bool(m.get("reference", False)))
        self.cfg = cfg
        self.use(n_examples if n_examples is not None else int(m.n_examples))
        self.evaluations = 0

    def use(self, n_examples: int, start: int = 0, batch_size: int | None = None) -> None:
        """Evaluate on prompts [start, start + n_examples) of the task's dataset (line order: one context's prompts
        are consecutive, so splits at multiples of `task.unit` never share a context)."""
        data_cfg = data_config(self.cfg, start + n_examples)
        tok = self.module.tokenizer
        self.loader = prompt_loader(self.task, tok, self.task.examples(data_cfg, tok)[start:], int(batch_size or self.cfg.method.batch_size),
                                    self.cfg.data.padding_side)

    def __call__(self, ablations):
        """[K, N] correctness of K ablations on the evaluation prompts."""
        correct = self.module.evaluate(self.trainer, self.loader, ablations)
        self.evaluations += len(ablations)
        return correct

    def logp(self) -> torch.Tensor:
        """[K, N] answer log-probabilities of the last call's ablations."""
        return self.module.acc.per_example_logp()
