"""`method=cmap` and `method=activation_patching`: head-set patching across models and within a model."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from etk.artifacts import write_text
from etk.errors import ConfigError, DataError
from etk.circuits import circuit_label, load_dcm_selection, resolve_circuit
from etk.data.datasets import prompt_loader
from etk.data.roles import MEMBERS
from etk.interventions.heads import HeadSet
from etk.methods.cmap.module import CMAPJob, CMAPModule
from etk.metrics import accuracy_ci, share_of_gap
from etk.models.arch import LlamaFamily
from etk.models.pair import load_pair
from etk.report.tables import markdown, with_ci
from etk.results import CMAPResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_logger, step_output
from etk.tasks import task_of


def cmap_circuit(cfg: DictConfig):
    """circuit= if given, else the fine-tuned member's own circuit (the paper patches the fine-tuned circuit)."""
    return resolve_circuit(cfg, cfg.pair.finetuned.get("circuit"))


def cmap_head_sets(cfg: DictConfig, circuit) -> tuple[dict[str, list], dict[str, str]]:
    """The heads patched per group and where they came from. The paper's choice (SPEC §6.1): DCM selections for VF
    (object value), PT and PD (positional), every SR head of the circuit. Selections come from `method.dcm_runs`
    (DCM results.json of this study) or, by default, the fine-tuned model config's `cmap_heads` (the paper's DCM
    files for Goat and FLoat, shipped in etk/data/dcm). A group without a selection keeps the circuit's heads. An
    EMPTY selection patches nothing, as the paper's code does (`method.empty_selection=nothing`, the source says
    `empty_selection`), or the circuit's whole group (`method.empty_selection=circuit`)."""
    groups = {g: list(hs) for g, hs in circuit.groups.items()}
    sources = {g: "circuit" for g in groups}
    selections = {load_dcm_selection(p).group: p for p in (cfg.method.get("dcm_runs") or [])}
    if not selections:
        selections = {g: f for g, f in (cfg.pair.finetuned.get("cmap_heads") or {}).items() if f}
    empty = str(cfg.method.get("empty_selection", "nothing"))
    if empty not in ("nothing", "circuit"):
        raise ConfigError(f"method.empty_selection = {empty!r}: 'nothing' (the paper: an empty DCM selection patches "
                          "no head) or 'circuit' (patch the circuit's whole group instead)")
    for group, path in selections.items():
        heads = load_dcm_selection(path).heads
        if heads:
            groups[group], sources[group] = heads, f"DCM selection {path}"
        elif empty == "nothing":
            groups[group], sources[group] = [], "empty_selection"
            print(f"[etk] CMAP: the DCM selection {path} holds no {group} heads; {group} patches nothing (the paper's "
                  "behaviour; method.empty_selection=circuit patches the circuit's group instead)")
        else:
            sources[group] = f"circuit (the DCM selection {path} is empty)"
            print(f"[etk] CMAP: the DCM selection {path} holds no {group} heads; patching the circuit's {group} group")
    return groups, sources


@dataclass
class PreparedCMAP:
    """One CMAP run's circuit, head sets and their sources, before the pass."""

    cfg: DictConfig
    spec: Any
    circuit: Any
    sources: dict[str, str]
    job: CMAPJob


def prepare(cfg: DictConfig, dims, task) -> PreparedCMAP:
    spec, circuit = cmap_circuit(cfg)
    groups, sources = cmap_head_sets(cfg, circuit)
    sets = {}
    for name in (cfg.method.groups or [*task.group_names, "all"]):
        chosen = {g: groups.get(g, []) for g in task.group_names} if name == "all" else {name: groups.get(name, [])}
        sets[name] = HeadSet.from_circuit(chosen).check(dims)
    return PreparedCMAP(cfg, spec, circuit, sources, CMAPJob(str(cfg.method.direction), sets))


def batch_key(cfg: DictConfig) -> str | None:
    """Jobs whose configs differ only in direction, circuit and DCM selections (same pair, prompts, sizes) run on
    the same prompts: a study runs them as one pass (`run_cmap_batch`: each member runs once per batch for all of
    them). None with `method.reference`."""
    if cfg.method.get("reference"):
        return None
    plain = plain_config(cfg)
    plain["method"] = {k: v for k, v in plain["method"].items() if k not in ("direction", "dcm_runs")}
    plain.pop("circuit", None)
    return json.dumps(plain, sort_keys=True, default=str)


def run_cmap(cfg: DictConfig) -> CMAPResult:
    return run_cmap_batch([(cfg, None)])[0]


def run_cmap_batch(jobs: Sequence[tuple[DictConfig, Path | None]]) -> list[CMAPResult]:
    """Jobs of one `batch_key` (or one job) in one predict loop; each job's result goes to its folder (None: the
    run's folder)."""
    cfg = jobs[0][0]
    m = cfg.method
    L.seed_everything(cfg.seed, verbose=False)
    base_cfg, ft_cfg = (OmegaConf.to_container(cfg.pair[k], resolve=True) for k in MEMBERS)
    toggle = bool(m.get("toggle_adapter", True))
    pair = load_pair(base_cfg, ft_cfg, toggle)
    dims = LlamaFamily.of(pair.base).dims
    task = task_of(cfg)
    prepared = [prepare(c, dims, task) for c, _ in jobs]
    module = CMAPModule(base_cfg, ft_cfg, [p.job for p in prepared], toggle, pair, bool(m.get("reference", False)))
    data_cfg = data_config(cfg, m.n_examples)
    examples = task.examples(data_cfg, module.tokenizer)
    module.pair.check([task.text(e) for e in examples[:50]])
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, "CMAP: prompt batches")
        trainer.predict(module, prompt_loader(task, module.tokenizer, examples, int(m.batch_size), cfg.data.padding_side),
                        return_predictions=False)
        results = []
        for p, acc, (_, folder) in zip(prepared, module.accs, jobs):
            with step_output(folder) if folder is not None else nullcontext():
                results.append(emit(summarise(p, acc.per_example(), task, module.pair.toggled), logger))
        return results


def summarise(p: PreparedCMAP, c: torch.Tensor, task, toggled: bool) -> CMAPResult:
    """The typed result of one job from its per-example correctness c [2 + n_sets, N] (source alone, target alone,
    each set); writes its table."""
    cfg, m, sets = p.cfg, p.cfg.method, p.job.head_sets
    if c.numel() == 0:
        raise DataError("CMAP evaluated no prompt (the prompt set is empty): give data.n_examples >= 1 usable prompts")
    src_name, tgt_name = ((cfg.pair.finetuned.name, cfg.pair.base.name) if m.direction == "forward"
                          else (cfg.pair.base.name, cfg.pair.finetuned.name))
    rows = {"source_alone": accuracy_ci(c[0]), "target_alone": accuracy_ci(c[1])}
    rows.update({name: {**accuracy_ci(c[2 + i]), "heads_per_role": {r: len(h) for r, h in sets[name].roles.items()},
                        "share_of_gap": share_of_gap(c[2 + i], c[1], c[0], int(m.get("n_bootstrap", 2000)))}
                 for i, name in enumerate(sets)})
    header = ["heads patched", f"accuracy of {tgt_name} (95% CI)", "share of the gap [95% CI]"]
    table = [[f"none: {src_name} alone", with_ci(rows["source_alone"]), "1"],
             [f"none: {tgt_name} alone", with_ci(rows["target_alone"]), "0"]]
    n_heads = {n: len(sets[n]) for n in sets}
    table += [[f"{task.short.get(n, n)} ({n_heads[n]} head{'' if n_heads[n] == 1 else 's'}) {src_name} -> {tgt_name}",
               with_ci(rows[n]), with_ci(rows[n]["share_of_gap"], "share")] for n in sets]
    md = markdown(header, table)
    write_text(output_dir() / "cmap_table.md", md)
    print(f"[etk] CMAP {src_name} -> {tgt_name} ({circuit_label(p.spec, p.circuit)} circuit)\n{md}")
    payload = {"pair": cfg.pair.name, "direction": m.direction, "source_model": src_name, "target_model": tgt_name,
               "head_sources": p.sources, "adapter_toggled": toggled,
               "circuit": circuit_label(p.spec, p.circuit), "results": rows, "config": plain_config(cfg)}
    return CMAPResult.from_payload(payload)
