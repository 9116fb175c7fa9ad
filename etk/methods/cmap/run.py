"""`method=cmap` and `method=activation_patching`: head-set patching across models and within a model."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from etk.artifacts import write_text
from etk.errors import ConfigError, DataError
from etk.circuits import circuit_label, load_dcm_selection, resolve_circuit
from etk.data.datasets import prompt_loader
from etk.data.roles import MEMBERS
from etk.interventions.heads import HeadSet
from etk.methods.cmap.module import CMAPModule
from etk.metrics import accuracy_ci, share_of_gap
from etk.models.arch import LlamaFamily
from etk.models.pair import load_pair
from etk.report.tables import markdown, with_ci
from etk.results import CMAPResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_logger
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


def run_cmap(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method
    L.seed_everything(cfg.seed, verbose=False)
    spec, circuit = cmap_circuit(cfg)
    groups, sources = cmap_head_sets(cfg, circuit)
    base_cfg, ft_cfg = (OmegaConf.to_container(cfg.pair[k], resolve=True) for k in MEMBERS)
    toggle = bool(m.get("toggle_adapter", True))
    pair = load_pair(base_cfg, ft_cfg, toggle)
    dims = LlamaFamily.of(pair.base).dims
    task = task_of(cfg)
    sets = {}
    for name in (m.groups or [*task.group_names, "all"]):
        chosen = {g: groups.get(g, []) for g in task.group_names} if name == "all" else {name: groups.get(name, [])}
        sets[name] = HeadSet.from_circuit(chosen).check(dims)
    module = CMAPModule(base_cfg, ft_cfg, sets, m.direction, toggle, pair)
    data_cfg = data_config(cfg, m.n_examples)
    examples = task.examples(data_cfg, module.tokenizer)
    module.pair.check([task.text(e) for e in examples[:50]])
    with run_logger(cfg) as logger:
        trainer = make_trainer(cfg, "CMAP: prompt batches")
        trainer.predict(module, prompt_loader(task, module.tokenizer, examples, int(m.batch_size), cfg.data.padding_side),
                        return_predictions=False)
        c = module.acc.per_example()  # [2 + n_sets, N]
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
        print(f"[etk] CMAP {src_name} -> {tgt_name} ({circuit_label(spec, circuit)} circuit)\n{md}")
        payload = {"pair": cfg.pair.name, "direction": m.direction, "source_model": src_name, "target_model": tgt_name,
                   "head_sources": sources,
                   "adapter_toggled": module.pair.toggled,
                   "circuit": circuit_label(spec, circuit), "results": rows, "config": plain_config(cfg)}
        return emit(CMAPResult.from_payload(payload), logger)
