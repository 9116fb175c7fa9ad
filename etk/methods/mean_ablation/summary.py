"""Faithfulness F(C)/F(M) with a paired bootstrap interval, the random-circuit baseline (SPEC §3.2: same head counts
per role, heads drawn without replacement, [BUG-rand] fixed) and the all-heads reference: the circuit that keeps every head at
the task's vital positions under the same ablation. It is a reference, not a ceiling: a circuit that drops heads which
hurt under mean ablation can exceed it (measured on the embedded pair: README, "Against the paper")."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from etk.circuits import Circuit
from etk.data.roles import ROLE_ID
from etk.methods.mean_ablation.ablation import Ablation, all_heads_ablation, circuit_ablation, full_model
from etk.metrics import bootstrap_ratio, quantile_ci
from etk.models.arch import Dims

Evaluate = Callable[[list[Ablation]], torch.Tensor]  # K ablations -> [K, N] correctness
UNDEFINED = "the model answers no evaluation prompt correctly, so a ratio to its accuracy is undefined"


def random_ablation(like: Ablation, dims: Dims, rng: random.Random, name: str) -> Ablation:
    """Same number of heads at each role as `like`, drawn without replacement from all heads (`HeadSet.random_like`);
    roles where `like` keeps every head or none (the non-vital positions) are left as they are."""
    kept = like.head_set(partial_only=True)
    keep = like.keep.clone()
    keep[[ROLE_ID[r] for r in kept.roles]] = False
    return Ablation(keep | kept.random_like(dims, rng).keep(dims), name, like.vital)


def ratio(a: float, b: float, legacy_rounding: bool = False) -> float | None:
    """F(C)/F(M) (None when F(M) = 0); `legacy_rounding` rounds both accuracies and the ratio to 2 decimals as the
    paper did."""
    if legacy_rounding:
        a, b = round(a, 2), round(b, 2)
        return round(a / b, 2) if b else None
    return a / b if b else None


def faithfulness(evaluate: Evaluate, circuit: Circuit, dims: Dims, n_random: int = 10, seed: int = 5,
                 ablate_non_vital: bool = True, legacy_rounding: bool = False, n_boot: int = 2000,
                 vital: Sequence[str] | None = None) -> dict[str, Any]:
    """Faithfulness of `circuit` with its CI, its all-heads reference and random circuits, from one batch of ablations; `vital`:
    the task's vital roles (default: those of the circuit's task)."""
    circ = circuit_ablation(circuit, dims, ablate_non_vital, vital=vital)
    rng = random.Random(seed)
    rand = [random_ablation(circ, dims, rng, f"random{i}") for i in range(n_random)]
    correct = evaluate([full_model(dims), circ, all_heads_ablation(dims, ablate_non_vital, circ.vital)] + rand)  # [3 + n_random, N]
    return summarise(correct[0], correct[1], correct[2], correct[3:], circ.heads_per_role(), legacy_rounding, n_boot,
                     {"n_draws": n_random, "seed": seed})


def summarise(model_c: torch.Tensor, circ_c: torch.Tensor, ceil_c: torch.Tensor, rand_c: torch.Tensor,
              heads_per_role: dict[str, int], legacy_rounding: bool = False, n_boot: int = 2000,
              random_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The faithfulness document from per-prompt correctness [N] of the model, the circuit, the all-heads reference and
    random circuits [n, N]. Undefined ratios are None with a `reason`, never NaN."""
    acc_m, acc_c, acc_ceil = float(model_c.mean()), float(circ_c.mean()), float(ceil_c.mean())
    defined = acc_m > 0
    lo, hi = bootstrap_ratio(circ_c, model_c, n_boot=n_boot) if defined else (None, None)
    f, f_ceil = ratio(acc_c, acc_m, legacy_rounding), ratio(acc_ceil, acc_m, legacy_rounding)
    rf = [ratio(float(r.mean()), acc_m, legacy_rounding) for r in rand_c]
    rft = torch.tensor([x for x in rf if x is not None], dtype=torch.float64)
    rf_lo, rf_hi = quantile_ci(rft) if len(rft) > 1 else (None, None)
    out = {
        "accuracy_model": acc_m,
        "accuracy_circuit": acc_c,
        "faithfulness": f,
        "ci_low": lo, "ci_high": hi,
        "all_heads": {"accuracy": acc_ceil, "faithfulness": f_ceil},
        "relative_to_all_heads": (f / f_ceil) if f is not None and f_ceil else None,
        "n": int(model_c.shape[0]),
        "heads_per_role": heads_per_role,
        "random": {
            **(random_meta or {}),
            "accuracy": [float(r.mean()) for r in rand_c],
            "faithfulness_mean": float(rft.mean()) if len(rft) else None,
            "faithfulness_sd": float(rft.std(unbiased=False)) if len(rft) else None,
            "ci_low": rf_lo, "ci_high": rf_hi,
        },
    }
    if not defined:
        out["reason"] = UNDEFINED
    elif out["relative_to_all_heads"] is None:
        out["reason_relative_to_all_heads"] = "the all-heads circuit answers no prompt correctly"
    return out
