"""The mean-ablation evaluator every circuit method calls: loads the model, computes the per-position means on the
ablation set (SPEC §3.1), and evaluates batches of ablations on the evaluation prompts, one predict loop per call."""

from __future__ import annotations

import random

import lightning as L
import torch
from omegaconf import DictConfig

from etk.circuits import Circuit
from etk.data.boxes import generate_contexts
from etk.data.datasets import make_template, prompt_loader, task_examples, task_vocab
from etk.data.pairs import mean_ablation_examples
from etk.interventions.components import check_heads
from etk.methods.mean_ablation.module import AblationEval, MeansModule
from etk.models.loading import LoadedModel, load
from etk.runtime import data_config, trainer_kwargs


class Evaluator:
    """Loads the model, computes the per-position means on the ablation set, and evaluates ablations on the
    evaluation prompts (`data` with `n_examples`, default `method.n_examples`)."""

    def __init__(self, cfg: DictConfig, circuit: Circuit | None = None, n_examples: int | None = None,
                 model: LoadedModel | None = None):
        m = cfg.method
        model = model or load(cfg.model)
        self.dims = model.arch.dims
        for heads in (circuit.groups.values() if circuit is not None else []):
            check_heads(heads, self.dims)
        tok = model.tokenizer
        self.trainer = L.Trainer(**trainer_kwargs(cfg), logger=False)
        objects, labels = task_vocab(tok, cfg.data.n_boxes, cfg.data.get("objects", "objects.csv"))
        contexts = generate_contexts(int(cfg.ablation.n_prompts), cfg.data.n_boxes, objects, labels, cfg.data.seed)
        abl = mean_ablation_examples(contexts, random.Random(int(cfg.ablation.seed)), make_template(cfg.data.get("template")))
        means = MeansModule(model.cfg, model)
        self.trainer.predict(means, prompt_loader(tok, abl, int(m.batch_size), cfg.data.padding_side),
                             return_predictions=False)
        self.module = AblationEval(model.cfg, means.means(), int(m.ablations_per_forward),
                                   int(m.get("vital_rows_per_forward", 2048)), bool(m.get("vital_fast_path", True)),
                                   model)
        self.cfg = cfg
        self.use(n_examples if n_examples is not None else int(m.n_examples))
        self.evaluations = 0

    def use(self, n_examples: int, start: int = 0, batch_size: int | None = None) -> None:
        """Evaluate on prompts [start, start + n_examples) of the generated dataset (line order: one context's
        queries are consecutive, so splits at multiples of data.n_boxes never share a context)."""
        data_cfg = data_config(self.cfg, start + n_examples)
        self.module.forget_backgrounds()
        tok = self.module.tokenizer
        self.loader = prompt_loader(tok, task_examples(data_cfg, tok)[start:], int(batch_size or self.cfg.method.batch_size),
                                    self.cfg.data.padding_side)

    def __call__(self, ablations):
        """[K, N] correctness of K ablations on the evaluation prompts."""
        correct = self.module.evaluate(self.trainer, self.loader, ablations)
        self.evaluations += len(ablations)
        return correct

    def logp(self) -> torch.Tensor:
        """[K, N] answer log-probabilities of the last call's ablations."""
        return self.module.acc.per_example_logp()
