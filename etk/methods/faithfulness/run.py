"""`method=faithfulness`: F(circuit)/F(model) under mean ablation, with its all-heads reference and random circuits."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.circuits import circuit_spec
from etk.methods.mean_ablation.runner import run_evaluated
from etk.methods.mean_ablation.summary import faithfulness
from etk.metrics import fmt
from etk.results import FaithfulnessResult


def run_faithfulness(cfg: DictConfig) -> FaithfulnessResult:
    m = cfg.method

    def body(ev, circuit):
        r = faithfulness(ev, circuit, ev.dims, int(m.n_random), int(m.random_seed), bool(m.ablate_non_vital),
                         bool(m.legacy_rounding), int(m.n_bootstrap), ev.vital)
        c = r["all_heads"]
        print(f"[etk] faithfulness of {circuit_spec(cfg)} on {cfg.model.name}: {fmt(r['faithfulness'])} (95% CI "
              f"{fmt(r['ci_low'])}-{fmt(r['ci_high'])}; circuit acc {r['accuracy_circuit']:.3f}, model acc "
              f"{r['accuracy_model']:.3f}); every head at the task's vital positions {fmt(c['faithfulness'])} (acc "
              f"{c['accuracy']:.3f}), relative to all heads {fmt(r['relative_to_all_heads'])}; random circuits "
              f"{fmt(r['random']['faithfulness_mean'])} ± {fmt(r['random']['faithfulness_sd'])}")
        return r
    return run_evaluated(cfg, FaithfulnessResult, body)
