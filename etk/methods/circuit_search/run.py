"""`method=circuit_search`: a position-aware circuit of (head, position role) units grown and pruned to a target
faithfulness on a search split (`search.py`), reported on held-out prompts with its all-heads reference and random circuits."""

from __future__ import annotations

import random
import time

import torch
from omegaconf import DictConfig

from etk.data.roles import ROLE_VOCAB
from etk.methods.circuit_search.search import (
    UnitAttribution,
    circuit_from_keep,
    exact_removal_effects,
    grow_and_prune,
    verify_subset,
)
from etk.methods.mean_ablation.ablation import Ablation, all_heads_ablation, full_model
from etk.methods.mean_ablation.runner import run_evaluated
from etk.methods.mean_ablation.summary import random_ablation, summarise
from etk.metrics import fmt, spearman
from etk.report.plots import role_head_heatmap
from etk.results import CircuitSearchResult
from etk.runtime import make_trainer, output_dir
from etk.tasks import task_of


def run_circuit_search(cfg: DictConfig) -> CircuitSearchResult:
    """Position-aware circuit search (etk.methods.circuit_search.search): score (role, head) units, grow and prune to
    `method.target` faithfulness on a search split, report faithfulness on held-out prompts."""
    m = cfg.method
    nb = task_of(cfg).unit(cfg.data)
    n_search = -(-int(m.n_search) // nb) * nb  # whole contexts, so the held-out split shares none

    def body(ev, _):
        dims, t0 = ev.dims, time.time()
        full, vital = full_model(dims), ev.vital
        acc_model = float(ev([full]).mean())
        if acc_model == 0:
            print(f"[etk] circuit search on {cfg.model.name}: the model answers none of the {n_search} search prompts, "
                  "so there is nothing for a circuit to explain")
            return {"faithfulness": None, "reason": "the model answers no search prompt correctly", "units_kept": 0,
                    "unit_fraction": None, "heads_per_role": {}, "accuracy_model": 0.0}
        # roles that occur in these prompts: the unit space
        ev.use(n_search, batch_size=int(m.attribution_batch_size))
        attr_loader = ev.loader
        attr_trainer = make_trainer(cfg, "circuit search, attribution: prompt batches", inference_mode=False)

        def attribution(base: torch.Tensor | None) -> UnitAttribution:
            att = UnitAttribution(ev.module.net, ev.module.means, int(m.steps), base)
            attr_trainer.predict(att, attr_loader, return_predictions=False)
            return att

        first = attribution(None)
        present = first.tokens_per_role() > 0  # [R]
        shape = (len(ROLE_VOCAB), dims.n_layers, dims.n_heads)
        valid = present[:, None, None].expand(shape).flatten()
        n_units = int(valid.sum())
        ev.use(n_search)
        method = "exact" if n_units <= int(m.exact_max_units) else "attribution"
        if method == "exact":  # each unit's exact removal effect from the full model: a static ranking
            idx = valid.nonzero()[:, 0]
            scores = torch.full((valid.numel(),), -torch.inf)
            scores[idx] = exact_removal_effects(lambda a: (ev(a), ev.logp())[1], full, idx.tolist(), shape)
        else:
            scores = first.scores().flatten().masked_fill(~valid, -torch.inf)
        t_score = time.time() - t0

        def rank(keep: torch.Tensor) -> torch.Tensor:
            """Units not in `keep`, best first: by the static scores, or re-scored by attribution along the path from
            the circuit to the full model once the circuit is not empty."""
            s = scores if method == "exact" or not keep.any() else attribution(keep).scores().flatten()
            s = s.masked_fill(~valid | keep.flatten(), -torch.inf)
            return torch.argsort(s, descending=True, stable=True)[: int(torch.isfinite(s).sum())]

        order = rank(torch.zeros(shape, dtype=torch.bool))
        keep, f_search, trace = grow_and_prune(ev, rank, dims, acc_model, float(m.target),
                                               int(float(m.max_unit_fraction) * n_units), int(m.grid_points),
                                               int(m.grow_rounds), int(m.refine_points), int(m.prune_chunks),
                                               int(m.prune_rounds), vital, lazy_grid=not bool(m.get("reference", False)))
        t_search = time.time() - t0 - t_score
        verification = None
        if method == "attribution" and int(m.n_verify) > 0:
            sub = verify_subset(order, scores, int(m.n_verify), int(m.random_seed))
            ev.use(min(n_search, int(m.verify_prompts)))
            lp = lambda a: (ev(a), ev.logp())[1]  # noqa: E731
            from_model = exact_removal_effects(lp, full, sub, shape)
            in_circuit = [u for u in sub if keep.view(-1)[u]]
            from_circ = exact_removal_effects(lp, Ablation(keep, vital=vital), in_circuit, shape) if in_circuit else torch.zeros(0)
            a = scores[sub]
            verification = {
                "units": len(sub), "prompts": min(n_search, int(m.verify_prompts)),
                "spearman_vs_removal_from_model": spearman(a, from_model),
                "spearman_vs_removal_from_circuit": spearman(scores[in_circuit], from_circ),
                "sign_agreement_vs_removal_from_model": float(((a > 0) == (from_model > 0)).float().mean()),
                "rows": [{"unit": [ROLE_VOCAB[u // (dims.n_layers * dims.n_heads)], (u // dims.n_heads) % dims.n_layers,
                                   u % dims.n_heads], "attribution": float(scores[u]), "removal_from_model": float(e)}
                         for u, e in zip(sub, from_model)],
            }
        # held-out prompts: faithfulness with CI, the all-heads reference, random circuits of the same sizes
        ev.use(int(m.n_heldout), start=n_search)
        circ = Ablation(keep, "circuit", vital)
        rng = random.Random(int(m.random_seed))
        rand = [random_ablation(circ, dims, rng, f"random{i}") for i in range(int(m.n_random))]
        c = ev([full, circ, all_heads_ablation(dims, vital=vital)] + rand)
        doc = summarise(c[0], c[1], c[2], c[3:], circ.heads_per_role(), False, int(m.n_bootstrap),
                        {"n_draws": int(m.n_random), "seed": int(m.random_seed)})
        kept = int(keep.sum())
        circuit = circuit_from_keep(keep, {"model": cfg.model.name, "kind": "position_aware", "target": float(m.target),
                                           "scoring": method, "faithfulness_heldout": doc["faithfulness"]})
        circuit.save(output_dir() / "circuit.json")
        role_head_heatmap(keep, present, output_dir() / "circuit.png", f"{cfg.model.name}: position-aware circuit")
        print(f"[etk] circuit search on {cfg.model.name}: {kept} of {n_units} units ({100 * kept / n_units:.1f}%), "
              f"faithfulness {fmt(doc['faithfulness'])} [{fmt(doc['ci_low'])}, {fmt(doc['ci_high'])}] on "
              f"{doc['n']} held-out prompts (search split {f_search:.3f}, target {float(m.target)}); every head at "
              f"the three positions {fmt(doc['all_heads']['faithfulness'])}; random circuits {fmt(doc['random']['faithfulness_mean'])}"
              + (f"; attribution vs exact Spearman {fmt(verification['spearman_vs_removal_from_model'], 2)}"
                 if verification else ""))
        return {"faithfulness": doc["faithfulness"], "ci_low": doc["ci_low"], "ci_high": doc["ci_high"],
                "all_heads": doc["all_heads"], "relative_to_all_heads": doc["relative_to_all_heads"],
                "accuracy_model": doc["accuracy_model"], "accuracy_circuit": doc["accuracy_circuit"],
                "random": doc["random"], "n_heldout": doc["n"], "n_search": n_search,
                "faithfulness_search": f_search, "target": float(m.target), "target_reached_heldout":
                    doc["faithfulness"] is not None and doc["faithfulness"] >= float(m.target),
                "units_kept": kept, "units_total": n_units, "unit_fraction": kept / n_units,
                "heads_per_role": doc["heads_per_role"], "roles": [ROLE_VOCAB[r] for r in present.nonzero()[:, 0].tolist()],
                "scoring": method, "attribution_steps": int(m.steps), "verification": verification,
                "trace": {"rounds": trace.rounds, "prune": trace.prune, "evaluations": trace.evaluations},
                "seconds": {"scoring": round(t_score, 1), "search": round(t_search, 1),
                            "total": round(time.time() - t0, 1)}}
    return run_evaluated(cfg, CircuitSearchResult, body, needs_circuit=False)
