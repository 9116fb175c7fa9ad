"""`method=activation_patching`: a DCM head set patched from source prompts inside a model (repeats x resampled
sources), against the unpatched floor and a random head set of the same size."""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from omegaconf import DictConfig

from etk.circuits import load_dcm_selection
from etk.data.datasets import pair_loader
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet
from etk.methods.activation_patching.module import ActivationPatchingModule
from etk.metrics import accuracy_ci
from etk.interventions.prefix import cache_budget
from etk.models.loading import load
from etk.results import ActivationPatchingResult
from etk.runtime import data_config, emit, make_trainer, plain_config, run_device, run_logger, step_output
from etk.tasks import group_role, task_of


@dataclass
class PatchedSet:
    """One job's head set (a DCM selection) and its random control, patched from the job's desideratum's sources."""

    cfg: DictConfig
    group: str
    desideratum: str
    heads: list
    selected: HeadSet
    random: HeadSet


def patched_set(cfg: DictConfig, dims) -> PatchedSet:
    m = cfg.method
    if not m.get("heads"):
        raise ConfigError("method=activation_patching needs method.heads=<DCM results.json or selected_heads.json>")
    selection = load_dcm_selection(m.heads)
    group = selection.group
    desideratum = m.get("desideratum") or selection.desideratum
    if group is None or desideratum is None:
        raise ConfigError(f"method.heads={m.heads}: the selection does not say its group and desideratum; give a DCM "
                          "run's results.json or selected_heads.json (and method.desideratum=<name>)")
    selected = HeadSet.from_circuit({group: selection.heads}).check(dims)
    return PatchedSet(cfg, group, desideratum, selection.heads, selected,
                      selected.random_like(dims, random.Random(int(m.random_seed))))


def batch_key(cfg: DictConfig) -> str | None:
    """Jobs whose configs differ only in their head set (same model, prompts, desideratum, repeats, seeds) patch the
    same pairs: a study runs them as one pass (`run_activation_patching_batch`). None with `method.reference`."""
    m = cfg.method
    if m.get("reference") or not m.get("heads"):
        return None
    plain = plain_config(cfg)
    plain["method"] = {k: v for k, v in plain["method"].items() if k != "heads"}
    plain["method"]["desideratum"] = m.get("desideratum") or load_dcm_selection(m.heads).desideratum
    return json.dumps(plain, sort_keys=True, default=str)


def run_activation_patching(cfg: DictConfig) -> ActivationPatchingResult:
    return run_activation_patching_batch([(cfg, None)])[0]


def run_activation_patching_batch(jobs: Sequence[tuple[DictConfig, Path | None]]) -> list[ActivationPatchingResult]:
    """Jobs of one `batch_key` (or one job) in one predict loop: one source capture and one unpatched run per pair
    for all head sets, all repeats' loaders in that loop (`method.reference=true`: one loop per repeat and job, the
    pre-0.9 procedure; the same numbers). Each job's result goes to its folder (None: the run's folder)."""
    cfg = jobs[0][0]
    m = cfg.method
    L.seed_everything(cfg.seed, verbose=False)
    model = load(cfg.model, run_device(cfg))
    sets = [patched_set(c, model.arch.dims) for c, _ in jobs]
    desideratum, repeats = sets[0].desideratum, int(m.repeats)
    head_sets = {f"{i}/{kind}": hs for i, p in enumerate(sets) for kind, hs in (("selected", p.selected), ("random", p.random))}
    reference = bool(m.get("reference", False))
    module = ActivationPatchingModule(model.cfg, head_sets, cache_budget(m.get("cache_mb", "auto")), model,
                                      1 if reference else repeats, reference)
    task = task_of(cfg)
    bases = task.examples(data_config(cfg, m.n_examples), module.tokenizer)
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, f"activation patching, {desideratum}: pair batches", use_distributed_sampler=False)
        loaders = [pair_loader(task, module.tokenizer,
                               task.desideratum_pairs(desideratum, bases, int(m.random_seed) + r, bool(m.get("paper_compat", False))),
                               int(m.batch_size), padding_side=cfg.data.padding_side) for r in range(repeats)]
        if reference:
            per_repeat = []
            for loader in loaders:
                trainer.predict(module, loader, return_predictions=False)
                per_repeat.append(module.acc.compute().tolist())
        else:
            trainer.predict(module, loaders, return_predictions=False)
            per_repeat = [acc.compute().tolist() for acc in module.accs]
        a = torch.tensor(per_repeat) * 100  # [repeats, 1 + 2 * sets], percent: unpatched, then (selected, random) per set
        results = []
        for i, (p, (job_cfg, folder)) in enumerate(zip(sets, jobs)):
            with step_output(folder) if folder is not None else nullcontext():
                results.append(emit(summarise(job_cfg, p, a[:, [0, 1 + 2 * i, 2 + 2 * i]], len(bases)), logger))
        return results


def summarise(cfg: DictConfig, p: PatchedSet, a: torch.Tensor, n: int) -> ActivationPatchingResult:
    """The typed result of one head set from its accuracies a [repeats, 3] (percent: unpatched, selected, random)."""
    m = cfg.method
    summary = {}
    for i, name in enumerate(["unpatched_floor", "selected_heads", "random_heads"]):
        k = int(round(float((a[:, i] / 100 * n).sum())))
        summary[name] = {"mean": float(a[:, i].mean()), "sd": float(a[:, i].std(unbiased=False)),
                         "per_repeat": a[:, i].tolist(), "pooled": accuracy_ci(k=k, n=n * int(m.repeats))}
    print(f"[etk] activation patching {cfg.model.name} {p.group}/{p.desideratum}, {len(p.heads)} heads: "
          + ", ".join(f"{k} {v['mean']:.2f} ± {v['sd']:.2f} %" for k, v in summary.items()))
    payload = {"model": cfg.model.name, "group": p.group, "desideratum": p.desideratum, "heads": [list(h) for h in p.heads],
               "random_heads": [list(h) for h in p.random.heads(group_role(p.group))], "repeats": int(m.repeats), "n": n,
               "accuracy_percent": summary, "config": plain_config(cfg)}
    return ActivationPatchingResult.from_payload(payload)
