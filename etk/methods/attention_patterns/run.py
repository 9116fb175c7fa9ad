"""`method=attention_patterns circuit.path=<circuit.json>` (the paper's Fig. 1): where each group's heads attend, from the
group's role to every scalar role of the task (IOI: do the name movers at END look at IO rather than S1/S2?) and the
share on each token role (correct object, query label, the other boxes' objects, the template's words, ...), per head
and per group, with 95% intervals over prompts; a heads x token-roles figure per group."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig

from etk.circuits import circuit_label, resolve_circuit
from etk.data.datasets import prompt_loader
from etk.interventions.components import check_heads
from etk.methods.attention_patterns.module import AttentionModule
from etk.metrics import fmt, mean_ci
from etk.models.loading import load
from etk.report.plots import matrix_heatmap
from etk.results import AttentionPatternsResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_device, run_logger
from etk.tasks import group_role, task_of


def run_attention_patterns(cfg: DictConfig) -> AttentionPatternsResult:
    m = cfg.method
    L.seed_everything(cfg.seed, verbose=False)
    task = task_of(cfg)
    spec, circuit = resolve_circuit(cfg)
    groups = [g for g in (m.get("groups") or circuit.groups) if circuit.groups.get(g)]
    model = load(cfg.model, run_device(cfg))
    units = [(group_role(g), h) for g in groups for h in check_heads(circuit.groups[g], model.arch.dims)]
    keys = list(task.scalar_roles)
    module = AttentionModule(model.cfg, units, keys, model)
    data_cfg = data_config(cfg, m.n_examples)
    loader = prompt_loader(task, model.tokenizer, task.examples(data_cfg, model.tokenizer), int(m.batch_size),
                           cfg.data.padding_side)
    with run_logger(cfg) as logger:
        make_trainer(cfg, "attention patterns: prompt batches").predict(module, loader, return_predictions=False)
        p = module.probs()  # [N, U, K + 1]
        sh = module.shares()  # [N, U, R]
        present = [j for j, _ in enumerate(module.token_roles()) if float(sh[:, :, j].sum()) > 0]
        token_roles = [module.token_roles()[j] for j in present]
        names = keys + ["other"]
        out: dict[str, Any] = {}
        i = 0
        for g in groups:
            n = len(circuit.groups[g])
            block = p[:, i:i + n]  # [N, n, K + 1]
            share = sh[:, i:i + n][:, :, present]  # [N, n, R present]
            out[g] = {"role": group_role(g),
                      "group": {k: mean_ci(block[:, :, j].mean(1)) for j, k in enumerate(names)},
                      "by_token_role": {r: mean_ci(share[:, :, j].mean(1)) for j, r in enumerate(token_roles)},
                      "heads": [{"head": list(h), **{k: mean_ci(block[:, t, j]) for j, k in enumerate(names)}}
                                for t, h in enumerate(circuit.groups[g])]}
            heads = [f"{h[0]}.{h[1]}" for h in circuit.groups[g]]
            matrix_heatmap(share.mean(0).tolist(), heads, token_roles, output_dir() / f"attention_{g}.png",
                           f"{cfg.model.name}: {g} heads' attention from `{group_role(g)}` by token role")
            i += n
            print(f"[etk] attention of {g} ({n} heads) from `{group_role(g)}`: "
                  + ", ".join(f"{k} {fmt(out[g]['group'][k]['mean'], 2)}" for k in names))
        payload = {"model": cfg.model.name, "circuit": circuit_label(spec, circuit), "circuit_spec": str(spec),
                   "n": int(p.shape[0]), "key_roles": names, "token_roles": token_roles, "groups": out,
                   "figures": [f"attention_{g}.png" for g in groups], "config": plain_config(cfg)}
        return emit(AttentionPatternsResult.from_payload(payload), logger)
