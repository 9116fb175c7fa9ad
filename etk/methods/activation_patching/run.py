"""`method=activation_patching`: a DCM head set patched from source prompts inside a model (repeats x resampled
sources), against the unpatched floor and a random head set of the same size."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from etk.circuits import load_dcm_selection
from etk.data.datasets import pair_loader
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet
from etk.methods.activation_patching.module import ActivationPatchingModule
from etk.metrics import accuracy_ci
from etk.models.loading import load
from etk.results import ActivationPatchingResult
from etk.runtime import data_config, emit, plain_config, run_logger, trainer_kwargs
from etk.tasks import group_role, task_of


def run_activation_patching(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method
    if not m.get("heads"):
        raise ConfigError("method=activation_patching needs method.heads=<DCM results.json or selected_heads.json>")
    selection = load_dcm_selection(m.heads)
    group = selection.group
    desideratum = m.get("desideratum") or selection.desideratum
    if group is None or desideratum is None:
        raise ConfigError(f"method.heads={m.heads}: the selection does not say its group and desideratum; give a DCM "
                          "run's results.json or selected_heads.json (and method.desideratum=<name>)")
    heads = selection.heads
    L.seed_everything(cfg.seed, verbose=False)
    model = load(cfg.model)
    dims = model.arch.dims
    selected = HeadSet.from_circuit({group: heads}).check(dims)
    rand_set = selected.random_like(dims, random.Random(int(m.random_seed)))
    rand = rand_set.heads(group_role(group))
    module = ActivationPatchingModule(model.cfg, {"selected": selected, "random": rand_set},
                                      float(m.get("cache_mb", 512)), model)
    data_cfg = data_config(cfg, m.n_examples)
    task = task_of(cfg)
    bases = task.examples(data_cfg, module.tokenizer)
    with run_logger(cfg) as logger:
        trainer = L.Trainer(**trainer_kwargs(cfg), use_distributed_sampler=False, logger=False)
        per_repeat = []
        for r in range(int(m.repeats)):
            pairs = task.desideratum_pairs(desideratum, bases, int(m.random_seed) + r, bool(m.get("paper_compat", False)))
            trainer.predict(module, pair_loader(task, module.tokenizer, pairs, int(m.batch_size), padding_side=cfg.data.padding_side),
                            return_predictions=False)
            per_repeat.append(module.acc.compute().tolist())  # [unpatched, selected, random]
        a = torch.tensor(per_repeat) * 100  # [repeats, 3], percent
        names = ["unpatched_floor", "selected_heads", "random_heads"]
        summary = {}
        for i, n in enumerate(names):
            k = int(round(float((a[:, i] / 100 * len(bases)).sum())))
            summary[n] = {"mean": float(a[:, i].mean()), "sd": float(a[:, i].std(unbiased=False)),
                          "per_repeat": a[:, i].tolist(), "pooled": accuracy_ci(k=k, n=len(bases) * int(m.repeats))}
        print(f"[etk] activation patching {cfg.model.name} {group}/{desideratum}, {len(heads)} heads: "
              + ", ".join(f"{n} {v['mean']:.2f} ± {v['sd']:.2f} %" for n, v in summary.items()))
        payload = {"model": cfg.model.name, "group": group, "desideratum": desideratum, "heads": [list(h) for h in heads],
                   "random_heads": [list(h) for h in rand], "repeats": int(m.repeats), "n": len(bases),
                   "accuracy_percent": summary, "config": plain_config(cfg)}
        return emit(ActivationPatchingResult.from_payload(payload), logger)
