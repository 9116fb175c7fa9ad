"""`method=minimality`: the paper's significance pruning of a circuit's candidate sets; writes the pruned circuit.json."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.circuits import Circuit, circuit_spec
from etk.methods.mean_ablation.runner import run_evaluated
from etk.methods.minimality.minimality import minimality
from etk.results import MinimalityResult
from etk.runtime import output_dir


def run_minimality(cfg: DictConfig) -> MinimalityResult:
    m = cfg.method

    def body(ev, circuit):
        r = minimality(ev, circuit, ev.dims, float(m.threshold), str(m.mode), float(m.frac), ev.vital)
        pruned: Circuit = r.pop("circuit")
        pruned.meta.update({"model": cfg.model.name, "source_circuit": circuit_spec(cfg)})
        pruned.save(output_dir() / "circuit.json")
        done = sum(g["evaluations"] for g in r["groups"].values() if "evaluations" in g)
        paper = sum(g["paper_evaluations"] for g in r["groups"].values() if "paper_evaluations" in g)
        n2 = sum(g["n"] ** 2 for g in r["groups"].values())
        print(f"[etk] minimality ({m.mode}, threshold {m.threshold}): kept " +
              ", ".join(f"{g} {v.get('kept', 0)}/{v['n']}" for g, v in r["groups"].items()) +
              f"; {done} evaluations (paper's procedure: {paper}; sum n^2 = {n2})")
        return {**r, "pruned": pruned.to_json(), "evaluations_done": done, "paper_evaluations": paper, "sum_n_squared": n2}
    return run_evaluated(cfg, MinimalityResult, body)
