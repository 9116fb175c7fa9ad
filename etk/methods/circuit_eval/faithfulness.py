"""Faithfulness F(C)/F(M) with a paired bootstrap interval, and the random-circuit baseline (SPEC §3.2):
same head counts per role, heads drawn without replacement ([BUG-rand] fixed)."""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from etk.circuits import Circuit
from etk.methods.circuit_eval.ablation import VITAL_ROLES, Ablation, circuit_ablation, full_model
from etk.metrics import bootstrap_ratio
from etk.models.arch import Dims

Evaluate = Callable[[list[Ablation]], torch.Tensor]  # K ablations -> [K, N] correctness


def random_ablation(counts: list[int], dims: Dims, rng: random.Random, ablate_non_vital: bool, name: str) -> Ablation:
    """Same number of heads at each vital role as the circuit, drawn without replacement from all heads."""
    keep = torch.zeros(3, dims.n_layers, dims.n_heads, dtype=torch.bool)
    n = dims.n_layers * dims.n_heads
    for r, k in enumerate(counts):
        for idx in rng.sample(range(n), k):
            keep[r, idx // dims.n_heads, idx % dims.n_heads] = True
    return Ablation(keep, ablate_non_vital, name)


def ratio(a: float, b: float, legacy_rounding: bool) -> float:
    """F(C)/F(M); `legacy_rounding` rounds both accuracies and the ratio to 2 decimals as the paper did."""
    if legacy_rounding:
        a, b = round(a, 2), round(b, 2)
        return round(a / b, 2) if b else float("nan")
    return a / b if b else float("nan")


def faithfulness(evaluate: Evaluate, circuit: Circuit, dims: Dims, n_random: int = 10, seed: int = 5,
                 ablate_non_vital: bool = True, legacy_rounding: bool = False, n_boot: int = 2000) -> dict[str, Any]:
    circ = circuit_ablation(circuit, dims, ablate_non_vital)
    counts = [int(circ.keep[r].sum()) for r in range(3)]
    rng = random.Random(seed)
    rand = [random_ablation(counts, dims, rng, ablate_non_vital, f"random{i}") for i in range(n_random)]
    correct = evaluate([full_model(dims), circ] + rand)  # [2 + n_random, N]
    model_c, circ_c, rand_c = correct[0], correct[1], correct[2:]
    acc_m, acc_c = float(model_c.mean()), float(circ_c.mean())
    lo, hi = bootstrap_ratio(circ_c, model_c, n_boot=n_boot) if acc_m > 0 else (float("nan"), float("nan"))
    rf = torch.tensor([ratio(float(r.mean()), acc_m, legacy_rounding) for r in rand_c])
    rf_lo, rf_hi = (torch.quantile(rf, torch.tensor([0.025, 0.975])).tolist() if len(rf) > 1 else [float("nan")] * 2)
    return {
        "accuracy_model": acc_m,
        "accuracy_circuit": acc_c,
        "faithfulness": ratio(acc_c, acc_m, legacy_rounding),
        "ci_low": lo, "ci_high": hi,
        "n": int(correct.shape[1]),
        "heads_per_role": dict(zip(VITAL_ROLES, counts)),
        "random": {
            "n_draws": n_random, "seed": seed,
            "accuracy": [float(r.mean()) for r in rand_c],
            "faithfulness_mean": float(rf.mean()) if len(rf) else float("nan"),
            "faithfulness_sd": float(rf.std(unbiased=False)) if len(rf) else float("nan"),
            "ci_low": rf_lo, "ci_high": rf_hi,
        },
    }
