"""`method=causal_impact` (the paper's causal-impact figures): each head of the fine-tuned circuit with its
path-patching score in the fine-tuned model beside its score in the base model, split into the heads the base circuit
shares (per group) and the heads the fine-tuned circuit adds; per group the mean of each, a table and a scatter plot.

    python run_patching.py method=causal_impact circuit.path=<ft circuit.json> method.base_circuit=<base circuit.json>
        method.finetuned_scores=<ft path-patching run> method.base_scores=<base path-patching run>

No model is loaded: the scores are the two path-patching runs' score maps (more negative = more important)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from etk.circuits import circuit_label, load_circuit, resolve_circuit
from etk.errors import ConfigError
from etk.metrics import fmt
from etk.methods.faithfulness_curve.run import pp_scores
from etk.report.plots import scatter_plot
from etk.results import CausalImpactResult
from etk.runtime import emit, output_dir, plain_config, run_logger
from etk.tasks import task_of

PLOT = "causal_impact.png"


def causal_impact_rows(ft_circuit, base_circuit, ft_scores, base_scores) -> tuple[list[dict], dict[str, Any]]:
    """Per head of the fine-tuned circuit: its group, both scores and whether the base circuit has it in that group;
    per group the mean fine-tuned and base score of the shared and of the added heads (None where there are none)."""
    rows, summary = [], {}
    for g, heads in ft_circuit.groups.items():
        if g not in ft_scores or g not in base_scores:
            continue
        base_heads = set(base_circuit.groups.get(g, []))
        part = {"shared": [], "added": []}
        for h in heads:
            row = {"group": g, "head": [h.layer, h.head], "finetuned_score": float(ft_scores[g][h.layer, h.head]),
                   "base_score": float(base_scores[g][h.layer, h.head]), "shared": h in base_heads}
            rows.append(row)
            part["shared" if row["shared"] else "added"].append(row)
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs else None  # noqa: E731
        summary[g] = {kind: {"n": len(rs), "finetuned_mean": mean(rs, "finetuned_score"),
                             "base_mean": mean(rs, "base_score")} for kind, rs in part.items()}
    return rows, summary


def run_causal_impact(cfg: DictConfig) -> CausalImpactResult:
    m = cfg.method
    for key in ("finetuned_scores", "base_scores", "base_circuit"):
        if not m.get(key):
            raise ConfigError(f"method=causal_impact needs method.{key}=<...>: the fine-tuned and base path-patching "
                              "runs (their scores/) and the base circuit (circuit.json); circuit.path= the fine-tuned one")
    task = task_of(cfg)
    spec, ft = resolve_circuit(cfg)
    base = load_circuit(str(m.base_circuit))
    ft_scores, _ = pp_scores(m.finetuned_scores, task.group_names)
    base_scores, _ = pp_scores(m.base_scores, task.group_names)
    rows, summary = causal_impact_rows(ft, base, ft_scores, base_scores)
    with run_logger(cfg) as logger:
        scatter_plot([r["base_score"] for r in rows], [r["finetuned_score"] for r in rows],
                     ["shared" if r["shared"] else "added" for r in rows], output_dir() / PLOT,
                     "fine-tuned circuit heads: path-patching score in each model", "base model score",
                     "fine-tuned model score")
        for g, s in summary.items():
            print(f"[etk] causal impact {g}: shared {s['shared']['n']} heads (mean score fine-tuned "
                  f"{fmt(s['shared']['finetuned_mean'])}, base {fmt(s['shared']['base_mean'])}); added {s['added']['n']} "
                  f"(fine-tuned {fmt(s['added']['finetuned_mean'])}, base {fmt(s['added']['base_mean'])})")
        payload = {"circuit": circuit_label(spec, ft), "base_circuit": str(m.base_circuit), "heads": rows,
                   "groups": summary, "plot": PLOT, "config": plain_config(cfg)}
        return emit(CausalImpactResult.from_payload(payload), logger)
