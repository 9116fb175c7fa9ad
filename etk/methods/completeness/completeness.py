"""Completeness (SPEC §3.3): incompleteness |F(C \\ K) - F(M \\ K)| for random K (each circuit item with p = 1/2)
and for each whole group. F(M \\ K) ablates only K's heads at their roles; F(C \\ K) ablates everything but C \\ K."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from etk.circuits import Circuit
from etk.methods.mean_ablation.ablation import Ablation, circuit_ablation, full_model
from etk.models.arch import Dims
from etk.tasks import group_role

Evaluate = Callable[[list[Ablation]], torch.Tensor]


def completeness(evaluate: Evaluate, circuit: Circuit, dims: Dims, n_random: int = 10, p: float = 0.5,
                 seed: int = 5, vital: Sequence[str] | None = None,
                 named: dict[str, Circuit] | None = None) -> dict[str, Any]:
    """Incompleteness for `n_random` random K, each whole group, and each `named` circuit's heads that this circuit
    has (e.g. the heads a fine-tune shares with the base circuit, and those it adds)."""
    items = circuit.units()
    rng = random.Random(seed)
    Ks: list[tuple[str, list]] = [(f"random{i}", [it for it in items if rng.random() < p]) for i in range(n_random)]
    Ks += [(g, [(group_role(g), int(lay), int(h)) for lay, h in hs]) for g, hs in circuit.groups.items()]
    mine = set(items)
    Ks += [(name, [u for u in other.units() if u in mine]) for name, other in (named or {}).items()]
    circ, model = circuit_ablation(circuit, dims, True, vital=vital), full_model(dims)
    ablations = []
    for name, K in Ks:
        ablations += [circ.without(K, f"C-{name}"), model.without(K, f"M-{name}")]
    acc = evaluate(ablations).mean(1)  # [2 * len(Ks)]
    rows = [{"K": name, "size": len(K), "F_C_minus_K": float(acc[2 * i]), "F_M_minus_K": float(acc[2 * i + 1]),
             "incompleteness": abs(float(acc[2 * i] - acc[2 * i + 1]))} for i, (name, K) in enumerate(Ks)]
    rand = torch.tensor([[r["F_C_minus_K"], r["F_M_minus_K"], r["incompleteness"]] for r in rows[:n_random]])
    summary = {k: {"mean": float(rand[:, i].mean()), "sd": float(rand[:, i].std(unbiased=False))}
               for i, k in enumerate(["F_C_minus_K", "F_M_minus_K", "incompleteness"])} if n_random else {}
    n_groups = len(circuit.groups)
    return {"random": summary, "draws": rows[:n_random],
            "groups": {r["K"]: r for r in rows[n_random:n_random + n_groups]},
            "named": {r["K"]: r for r in rows[n_random + n_groups:]}, "n_random": n_random, "p": p, "seed": seed}
