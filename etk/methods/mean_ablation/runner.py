"""The one run template of the mean-ablation methods (faithfulness, completeness, minimality, the curve, circuit
search): seed, resolve the circuit, build the evaluator (model, per-position means), compute, write the typed result."""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
from omegaconf import DictConfig

from etk.circuits import Circuit, circuit_label, resolve_circuit
from etk.methods.mean_ablation.evaluator import Evaluator
from etk.results import Result
from etk.runtime import emit, plain_config, run_logger

Body = Callable[[Evaluator, "Circuit | None"], dict[str, Any]]  # the method's computation -> its record


def run_evaluated(cfg: DictConfig, result: type[Result], body: Body, needs_circuit: bool = True) -> Result:
    """Run `body(evaluator, circuit)` under the run's logger and write its record as a `result`, with the circuit's
    label and sizes, the evaluator's counts and the config."""
    L.seed_everything(cfg.seed, verbose=False)
    spec, circuit = resolve_circuit(cfg) if needs_circuit else (None, None)
    with run_logger(cfg) as logger:
        t0 = time.time()
        ev = Evaluator(cfg, circuit)
        res = body(ev, circuit)
        about = ({"circuit": circuit_label(spec, circuit), "circuit_spec": spec, "circuit_sizes": circuit.sizes()}
                 if circuit is not None else {})
        payload = {"model": cfg.model.name, **about, **res, "evaluations": ev.evaluations,
                   "forwards": {"full": ev.module.forwards, "vital_only": ev.module.vital_forwards},
                   "wall_s": round(time.time() - t0, 1), "config": plain_config(cfg)}
        return emit(result.from_payload(payload), logger)
