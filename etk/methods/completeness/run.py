"""`method=completeness`: incompleteness |F(C\\K) - F(M\\K)| for random K and for whole groups."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.circuits import circuit_spec
from etk.methods.completeness.completeness import completeness
from etk.methods.mean_ablation.runner import run_evaluated
from etk.metrics import fmt
from etk.results import CompletenessResult


def run_completeness(cfg: DictConfig) -> CompletenessResult:
    m = cfg.method

    def body(ev, circuit):
        r = completeness(ev, circuit, ev.dims, int(m.n_random), float(m.p), int(m.random_seed), ev.vital)
        rs = r["random"].get("incompleteness", {})
        print(f"[etk] incompleteness of {circuit_spec(cfg)} on {cfg.model.name}: random K {fmt(rs.get('mean'))} ± "
              f"{fmt(rs.get('sd'))}; groups " + ", ".join(f"{g} {v['incompleteness']:.3f}" for g, v in r["groups"].items()))
        return r
    return run_evaluated(cfg, CompletenessResult, body)
