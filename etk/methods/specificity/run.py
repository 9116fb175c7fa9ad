"""`method=specificity task=<B> circuit.path=<a circuit of task A>`: is a circuit specific to its task? The circuit's
heads are mean-ablated at every position (means over task B's ablation prompts) and task B's accuracy is measured,
against random head sets of the same size and the intact model. A circuit that is specific to task A costs task B
no more than random heads do."""

from __future__ import annotations

import random

from omegaconf import DictConfig

from etk.circuits import circuit_label, circuit_spec, load_circuit
from etk.errors import ConfigError
from etk.methods.mean_ablation.ablation import Ablation, full_model
from etk.methods.mean_ablation.runner import run_evaluated
from etk.metrics import accuracy_ci, fmt, quantile_ci
from etk.results import SpecificityResult
from etk.tasks import task_with_groups


def heads_everywhere(heads: list[tuple[int, int]], full: Ablation, name: str) -> Ablation:
    """`full` with every listed head mean-ablated at every position."""
    keep = full.keep.clone()
    for layer, head in heads:
        keep[:, layer, head] = False
    return Ablation(keep, name)


def run_specificity(cfg: DictConfig) -> SpecificityResult:
    m = cfg.method
    spec = circuit_spec(cfg)
    if not spec:
        raise ConfigError("method=specificity needs circuit.path=<circuit.json of another task's run> (or circuit=<name>)")
    circuit = load_circuit(spec)
    heads = sorted({(int(layer), int(h)) for hs in circuit.groups.values() for layer, h in hs})
    owner = task_with_groups(circuit.groups)

    def body(ev, _):
        dims, full = ev.dims, full_model(ev.dims)
        rng = random.Random(int(m.random_seed))
        every = [(layer, h) for layer in range(dims.n_layers) for h in range(dims.n_heads)]
        rand = [heads_everywhere(rng.sample(every, len(heads)), full, f"random{i}") for i in range(int(m.n_random))]
        c = ev([full, heads_everywhere(heads, full, "circuit")] + rand)  # [2 + n_random, N]
        acc_m, acc_c = accuracy_ci(c[0]), accuracy_ci(c[1])
        r = c[2:].float().mean(1)  # [n_random]
        lo, hi = quantile_ci(r) if len(r) > 1 else (None, None)
        doc = {"circuit_task": owner.name if owner else None, "n_heads": len(heads), "accuracy_model": acc_m,
               "accuracy_ablated": acc_c,
               "random": {"mean": float(r.mean()) if len(r) else None, "ci_low": lo, "ci_high": hi, "n_draws": len(r),
                          "seed": int(m.random_seed)},
               "drop": acc_m["accuracy"] - acc_c["accuracy"] if acc_m["n"] else None,
               "drop_random": acc_m["accuracy"] - float(r.mean()) if acc_m["n"] and len(r) else None}
        print(f"[etk] specificity: {len(heads)} heads of the {doc['circuit_task']} circuit ablated everywhere on "
              f"{ev.task.name}: accuracy {fmt(acc_m['accuracy'])} -> {fmt(acc_c['accuracy'])} (random heads "
              f"{fmt(doc['random']['mean'])})")
        return {"circuit": circuit_label(spec, circuit), "circuit_spec": str(spec), **doc}
    return run_evaluated(cfg, SpecificityResult, body, needs_circuit=False)
