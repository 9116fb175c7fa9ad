"""`method=completeness`: incompleteness |F(C\\K) - F(M\\K)| for random K, whole groups and named head sets
(`method.k_circuits`: circuit files, each K = its heads that the circuit has, named by the file's stem)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from etk.circuits import circuit_spec, load_circuit
from etk.methods.completeness.completeness import completeness
from etk.methods.mean_ablation.runner import run_evaluated
from etk.metrics import fmt
from etk.results import CompletenessResult


def run_completeness(cfg: DictConfig) -> CompletenessResult:
    m = cfg.method
    named = {Path(str(p)).stem: load_circuit(str(p)) for p in (m.get("k_circuits") or [])}

    def body(ev, circuit):
        r = completeness(ev, circuit, ev.dims, int(m.n_random), float(m.p), int(m.random_seed), ev.vital, named)
        rs = r["random"].get("incompleteness", {})
        print(f"[etk] incompleteness of {circuit_spec(cfg)} on {cfg.model.name}: random K {fmt(rs.get('mean'))} ± "
              f"{fmt(rs.get('sd'))}; " + ", ".join(f"{g} {v['incompleteness']:.3f}"
                                                   for g, v in {**r["groups"], **r["named"]}.items()))
        return r
    return run_evaluated(cfg, CompletenessResult, body)
