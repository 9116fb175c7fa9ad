"""`method=minimality`: the paper's significance pruning of a circuit's candidate sets; writes the pruned circuit.json."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.circuits import Circuit, circuit_spec
from etk.errors import ConfigError
from etk.methods.mean_ablation.runner import run_evaluated
from etk.methods.minimality.minimality import minimality
from etk.results import MinimalityResult
from etk.runtime import output_dir


DEFAULT_THRESHOLD = 0.01


def minimality_threshold(cfg: DictConfig) -> tuple[float, str]:
    """(threshold, where it came from): `method.threshold` when set, else the model config's
    `discovery.minimality_threshold` (the paper's per-model value), else 0.01."""
    if cfg.method.get("threshold") is not None:
        return float(cfg.method.threshold), "method.threshold"
    from_model = (cfg.model.get("discovery") or {}).get("minimality_threshold")
    if from_model is not None:
        return float(from_model), "model.discovery.minimality_threshold"
    return DEFAULT_THRESHOLD, "default"


def run_minimality(cfg: DictConfig) -> MinimalityResult:
    m = cfg.method
    threshold, source = minimality_threshold(cfg)

    def body(ev, circuit):
        paper = bool(m.get("paper_compat", False))
        if paper and str(m.mode) != "batched":
            raise ConfigError("method.paper_compat=true reproduces the paper's batched pair ranking: set method.mode=batched")
        r = minimality(ev, circuit, ev.dims, threshold, str(m.mode), float(m.frac), ev.vital, paper,
                       bool(m.get("reference", False)))
        r["threshold_source"] = source
        pruned: Circuit = r.pop("circuit")
        pruned.meta.update({"model": cfg.model.name, "source_circuit": circuit_spec(cfg)})
        pruned.save(output_dir() / "circuit.json")
        done = sum(g["evaluations"] for g in r["groups"].values() if "evaluations" in g)
        paper = sum(g["paper_evaluations"] for g in r["groups"].values() if "paper_evaluations" in g)
        n2 = sum(g["n"] ** 2 for g in r["groups"].values())
        print(f"[etk] minimality ({m.mode}, threshold {threshold} from {source}): kept " +
              ", ".join(f"{g} {v.get('kept', 0)}/{v['n']}" for g, v in r["groups"].items()) +
              f"; {done} evaluations, {r['evaluated']} of them distinct and run (paper's procedure: {paper}; "
              f"sum n^2 = {n2})")
        return {**r, "pruned": pruned.to_json(), "evaluations_done": done, "paper_evaluations": paper, "sum_n_squared": n2}
    return run_evaluated(cfg, MinimalityResult, body)
