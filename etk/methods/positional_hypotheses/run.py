"""`method=positional_hypotheses method.heads=<positional DCM results.json>` (the paper's third open question): the
head set patched from each probe's sources into its bases (as activation patching does, with a random head set of the
same size and the unpatched model beside it), and every patched answer scored against each hypothesis of
`etk.tasks.entity_tracking.hypotheses` at once. Probes: the paper's positional variants (`method.variants`) and
cross-length pairs (`method.source_boxes`: sources with another box count). Per probe and hypothesis the share of
pairs answered with that hypothesis's object (95% Wilson interval), counted only on pairs where that object is not
the base's own answer; pooled over the pairs where the hypotheses disagree, which one the heads follow."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

from etk.circuits import load_dcm_selection
from etk.data.datasets import pair_loader
from etk.data.vocab import single_token_id
from etk.errors import ConfigError, DataError
from etk.interventions.heads import HeadSet
from etk.methods.activation_patching.module import ActivationPatchingModule
from etk.metrics import accuracy_ci, fmt
from etk.interventions.prefix import cache_budget
from etk.models.loading import load
from etk.results import PositionalHypothesesResult
from etk.runtime import data_config, emit, make_trainer, plain_config, run_device, run_logger
from etk.tasks import group_role, task_of

ROWS = ("unpatched", "selected", "random")  # the module's rows: the model itself, the head set, a random head set


def target_ids(targets: list[dict[str, str | None]], answers: list[str], tokenizer,
               hypotheses: tuple[str, ...]) -> torch.Tensor:
    """[H, N] each hypothesis's target token per pair; -1 where it names no object or the base's own answer."""
    return torch.tensor([[single_token_id(tokenizer, t[h]) if t[h] is not None and t[h] != a else -1
                          for t, a in zip(targets, answers)] for h in hypotheses], dtype=torch.long)


def rates(pred: torch.Tensor, ids: torch.Tensor, hypotheses: tuple[str, ...],
          among: torch.Tensor | None = None) -> dict[str, Any]:
    """Per hypothesis and row: the share of pairs answered with the hypothesis's object (95% Wilson interval), over
    the pairs (of `among` [N] bool, default all) where that object exists and is not the base's own answer.
    `pred`: [rows, N] argmax ids; `ids`: [H, N] target ids (`target_ids`)."""
    out = {}
    for i, h in enumerate(hypotheses):
        valid = ids[i] >= 0 if among is None else (ids[i] >= 0) & among  # [N]
        out[h] = {r: accuracy_ci(pred[j][valid] == ids[i][valid]) for j, r in enumerate(ROWS)}
    return out


def apart_of(ids: torch.Tensor) -> torch.Tensor:
    """[N] bool: the pairs on which at least two hypotheses name different objects (neither the base's answer).
    `ids`: [H, N] target ids, -1 where a hypothesis names none or the base's own answer."""
    valid = ids >= 0  # [H, N]
    lo = torch.where(valid, ids, torch.iinfo(ids.dtype).max).min(0).values  # [N] smallest valid id
    hi = torch.where(valid, ids, -1).max(0).values  # [N] largest valid id
    return valid.any(0) & (lo != hi)


def pairwise(ids: torch.Tensor, pred: torch.Tensor, hypotheses: tuple[str, ...]) -> dict[str, Any]:
    """For every two hypotheses, over the pairs where both name an object (not the base's own answer) and the objects
    differ: the share answered with each one's object, per row (`rates`). `ids`: [H, N] target ids (-1: none);
    `pred`: [rows, N] argmax ids."""
    out = {}
    for i, a in enumerate(hypotheses):
        for j in range(i + 1, len(hypotheses)):
            b = hypotheses[j]
            apart = (ids[i] >= 0) & (ids[j] >= 0) & (ids[i] != ids[j])  # [N]
            out[f"{a}|{b}"] = {"n": int(apart.sum()), **rates(pred, ids[[i, j]], (a, b), apart)}
    return out


def run_positional_hypotheses(cfg: DictConfig) -> PositionalHypothesesResult:
    m = cfg.method
    task = task_of(cfg)
    if not task.hypotheses:
        raise ConfigError(f"method=positional_hypotheses: task {task.name!r} has no positional hypotheses "
                          "(entity tracking has: task=entity_tracking)")
    HYPOTHESES = task.hypotheses
    if not m.get("heads"):
        raise ConfigError("method=positional_hypotheses needs method.heads=<a positional DCM run's results.json>")
    selection = load_dcm_selection(m.heads)
    if selection.group is None:
        raise ConfigError(f"method.heads={m.heads}: the selection does not say its group; give a DCM run's results.json")
    if not selection.heads:
        raise DataError(f"method.heads={m.heads}: the DCM run selected no heads, so there is nothing to patch")
    L.seed_everything(cfg.seed, verbose=False)
    model = load(cfg.model, run_device(cfg))
    dims, tok = model.arch.dims, model.tokenizer
    selected = HeadSet.from_circuit({selection.group: selection.heads}).check(dims)
    rand_set = selected.random_like(dims, random.Random(int(m.random_seed)))
    module = ActivationPatchingModule(model.cfg, {"selected": selected, "random": rand_set}, cache_budget(m.cache_mb), model)
    module.record = True
    data_cfg = data_config(cfg, m.n_examples)
    bases = task.examples(data_cfg, tok)
    probes: dict[str, list] = {v: task.desideratum_pairs(v, bases, int(m.random_seed)) for v in m.variants}
    for n in m.source_boxes:
        pool_cfg = data_cfg.copy()
        with open_dict(pool_cfg):  # a fresh pool of prompts with n boxes, seeded apart from the bases
            pool_cfg.n_boxes, pool_cfg.seed = int(n), int(data_cfg.seed) + 1000 + int(n)
        probes[f"{n}_box_sources"] = task.cross_length_pairs(bases, task.examples(pool_cfg, tok), random.Random(int(m.random_seed)))
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, "positional hypotheses: pair batches", use_distributed_sampler=False)
        result, pooled_ids, pooled_pred = {}, [], []
        for name, pairs in probes.items():
            trainer.predict(module, pair_loader(task, tok, pairs, int(m.batch_size), padding_side=cfg.data.padding_side),
                            return_predictions=False)
            pred = module.predictions(len(pairs))  # [rows, N]
            targets = [task.hypothesis_targets(p, task.encode(tok, p.base), task.encode(tok, p.source)) for p in pairs]
            ids = target_ids(targets, [p.base.answer for p in pairs], tok, HYPOTHESES)  # [H, N]
            per = rates(pred, ids, HYPOTHESES)
            split = apart_of(ids)  # [N]
            result[name] = {"n": len(pairs), "disagreeing_pairs": int(split.sum()), "hypotheses": per,
                            "base_answer": {r: accuracy_ci(pred[j] == torch.tensor([single_token_id(tok, p.base.answer)
                                                                                      for p in pairs]))
                                            for j, r in enumerate(ROWS)}}
            pooled_ids.append(ids)
            pooled_pred.append(pred)
            result[name]["pairwise"] = pairwise(ids, pred, HYPOTHESES)
            print(f"[etk] {selection.group} heads, probe {name}: " + ", ".join(
                f"{h} {fmt(per[h]['selected']['accuracy'], 2)}" for h in HYPOTHESES)
                  + f" ({int(split.sum())} of {len(pairs)} pairs tell the hypotheses apart)")
        ids, pred = torch.cat(pooled_ids, 1), torch.cat(pooled_pred, 1)  # [H, M], [rows, M] every probe's pairs
        apart = apart_of(ids)  # [M]
        pooled = rates(pred, ids, HYPOTHESES, apart)
        payload = {"model": cfg.model.name, "group": selection.group, "role": group_role(selection.group),
                   "heads": [list(h) for h in selection.heads], "random_heads": [list(h) for h in rand_set.heads(group_role(selection.group))],
                   "hypotheses": list(HYPOTHESES), "probes": result, "pooled": pooled,
                   "n_pooled": int(apart.sum()), "pairwise": pairwise(ids, pred, HYPOTHESES), "config": plain_config(cfg)}
        return emit(PositionalHypothesesResult.from_payload(payload), logger)
