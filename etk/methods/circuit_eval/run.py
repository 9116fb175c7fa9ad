"""`method=faithfulness|completeness|minimality|overlap`: circuit evaluation under mean ablation."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from etk.artifacts import write_json
from etk.circuits import Circuit, circuit_label, load_circuit, overlap
from etk.errors import ConfigError
from etk.methods.circuit_eval.completeness import completeness
from etk.methods.circuit_eval.evaluator import Evaluator
from etk.methods.circuit_eval.faithfulness import faithfulness
from etk.methods.circuit_eval.minimality import minimality
from etk.metrics import fmt, spearman
from etk.runners.common import (run_logger, circuit_spec, emit, output_dir, plain_config,
                                require_circuit, trainer_kwargs)


def _run(cfg: DictConfig, schema: str, body, needs_circuit: bool = True) -> dict[str, Any]:
    L.seed_everything(cfg.seed, verbose=False)
    spec, circuit = require_circuit(cfg) if needs_circuit else (None, None)
    with run_logger(cfg) as logger:
        t0 = time.time()
        ev = Evaluator(cfg, circuit)
        res = body(ev, circuit)
        about = ({"circuit": circuit_label(spec, circuit), "circuit_spec": spec, "circuit_sizes": circuit.sizes()}
                 if circuit is not None else {})
        payload = {"model": cfg.model.name, **about, **res, "evaluations": ev.evaluations,
                   "forwards": {"full": ev.module.forwards, "vital_only": ev.module.vital_forwards},
                   "wall_s": round(time.time() - t0, 1), "config": plain_config(cfg)}
        return emit(payload, schema, logger, {k: v for k, v in res.items() if isinstance(v, (int, float))})


def _evaluated(cfg: DictConfig, schema: str, compute, describe) -> dict[str, Any]:
    """A circuit method that computes one document from the evaluator and prints one line describing it."""
    def body(ev, circuit):
        r = compute(ev, circuit)
        print(f"[etk] {describe(r)}")
        return r
    return _run(cfg, schema, body)


def run_faithfulness(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method

    def describe(r):
        c = r["ceiling"]
        return (f"faithfulness of {circuit_spec(cfg)} on {cfg.model.name}: {fmt(r['faithfulness'])} (95% CI "
                f"{fmt(r['ci_low'])}-{fmt(r['ci_high'])}; circuit acc {r['accuracy_circuit']:.3f}, model acc "
                f"{r['accuracy_model']:.3f}); ceiling of three-position circuits {fmt(c['faithfulness'])} (acc "
                f"{c['accuracy']:.3f}), relative to ceiling {fmt(r['relative_to_ceiling'])}; random circuits "
                f"{fmt(r['random']['faithfulness_mean'])} ± {fmt(r['random']['faithfulness_sd'])}")
    return _evaluated(cfg, "etk.faithfulness/v1", lambda ev, c: faithfulness(
        ev, c, ev.dims, int(m.n_random), int(m.random_seed), bool(m.ablate_non_vital), bool(m.legacy_rounding),
        int(m.n_bootstrap)), describe)


def run_completeness(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method

    def describe(r):
        rs = r["random"].get("incompleteness", {})
        return (f"incompleteness of {circuit_spec(cfg)} on {cfg.model.name}: random K {fmt(rs.get('mean'))} ± "
                f"{fmt(rs.get('sd'))}; groups " + ", ".join(f"{g} {v['incompleteness']:.3f}" for g, v in r["groups"].items()))
    return _evaluated(cfg, "etk.completeness/v1",
                      lambda ev, c: completeness(ev, c, ev.dims, int(m.n_random), float(m.p), int(m.random_seed)), describe)


def run_minimality(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method

    def body(ev, circuit):
        r = minimality(ev, circuit, ev.dims, float(m.threshold), str(m.mode), float(m.frac))
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
    return _run(cfg, "etk.minimality/v1", body)


def run_overlap(cfg: DictConfig) -> dict[str, Any]:
    spec_a, a = require_circuit(cfg)
    if not cfg.method.get("other"):
        raise ConfigError("method=overlap needs method.other=<circuit name or path>")
    b = load_circuit(str(cfg.method.other))
    res = overlap(a, b)
    for g, v in res.items():
        print(f"[etk] {g}: shared {v['shared']} (precision {v['precision']:.2f}, recall {v['recall']:.2f})")
    payload = {"a": spec_a, "b": str(cfg.method.other), "overlap": res}
    return emit(payload, "etk.overlap/v1")


def pp_scores(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The four groups' score maps of a path-patching run (or a folder of `<group>.json` maps) and their masks of
    scored heads (all heads where the map does not record its reachable layers)."""
    from etk.circuits import GROUPS, load_score_map
    from etk.models.loading import resolve_path

    root = resolve_path(str(run_dir))
    folder = root / "scores" if (root / "scores").is_dir() else root
    scores, scored = {}, {}
    for g in GROUPS:
        p = folder / f"{g}.json"
        if not p.exists():
            continue
        scores[g] = load_score_map(p)
        layers = json.loads(p.read_text()).get("reachable_layers")
        mask = torch.ones_like(scores[g], dtype=torch.bool)
        if layers is not None:
            mask[:] = False
            mask[layers] = True
        scored[g] = mask
    if not scores:
        raise ConfigError(f"scores={run_dir}: no <group>.json score maps in {folder} (give a path-patching run "
                                "directory or its scores/ folder)")
    return scores, scored


def run_faithfulness_curve(cfg: DictConfig) -> dict[str, Any]:
    """Faithfulness of each group's top-x% heads, x over `method.fractions`, with CIs, CPR/CMD and curve.png."""
    from etk.methods.circuit_eval.ablation import ceiling_ablation, circuit_ablation, full_model
    from etk.methods.circuit_eval.curve import curve_circuits, curve_points, integrated
    from etk.methods.circuit_eval.faithfulness import random_ablation, summarise
    from etk.report.plots import curve_plot

    m = cfg.method
    if not cfg.get("scores"):
        raise ConfigError("method=faithfulness_curve needs scores=<path-patching run dir>")
    scores, scored = pp_scores(cfg.scores)

    def body(ev, _):
        dims = ev.dims
        if next(iter(scores.values())).shape != (dims.n_layers, dims.n_heads):
            raise ConfigError(f"scores={cfg.scores} are {tuple(next(iter(scores.values())).shape)} maps but "
                             f"{cfg.model.name} has {dims.n_layers} layers x {dims.n_heads} heads")
        fr = sorted(float(x) for x in m.fractions)
        points = curve_circuits(scores, scored, fr)
        rng = random.Random(int(m.random_seed))
        abls = [full_model(dims), ceiling_ablation(dims, bool(m.ablate_non_vital))]
        circs = [circuit_ablation(c, dims, bool(m.ablate_non_vital), f"{x}") for x, c in points]
        rand = [[random_ablation(a, dims, rng, f"random{i}@{a.name}") for i in range(int(m.n_random))] for a in circs]
        correct = ev(abls + circs + [r for rs in rand for r in rs])  # one batch of every configuration
        model_c, ceil_c = correct[0], correct[1]
        nr = int(m.n_random)
        docs = [summarise(model_c, correct[2 + i], ceil_c, correct[2 + len(circs) + i * nr: 2 + len(circs) + (i + 1) * nr],
                          a.heads_per_role(), False, int(m.n_bootstrap)) for i, a in enumerate(circs)]
        pts = curve_points(fr, [c for _, c in points], docs)
        for p, d in zip(pts, docs):
            p["random_faithfulness_mean"] = d["random"]["faithfulness_mean"]
        ceiling = docs[0]["ceiling"]
        defined = all(p["faithfulness"] is not None for p in pts)
        area = integrated(fr, [p["faithfulness"] for p in pts]) if defined else {"cpr": None, "cmd": None}
        curve = {"model": cfg.model.name, "scores": str(cfg.scores), "points": pts, **area, "ceiling": ceiling,
                 "accuracy_model": docs[0]["accuracy_model"], "n": docs[0]["n"],
                 "ablate_non_vital": bool(m.ablate_non_vital)}
        if not defined:
            curve["reason"] = docs[0]["reason"]
        write_json(output_dir() / "curve.json", curve, "etk.curve/v1")
        curve_plot({cfg.model.name: curve}, output_dir() / "curve.png", f"{cfg.model.name}: faithfulness vs circuit size")
        print(f"[etk] faithfulness curve of {cfg.model.name}: " + ", ".join(
            f"{100 * p['fraction']:g}% {fmt(p['faithfulness'], 2)}" for p in pts)
              + f"; CPR {fmt(area['cpr'])}, CMD {fmt(area['cmd'])}; ceiling {fmt(ceiling['faithfulness'])}")
        return {k: v for k, v in curve.items() if k != "model"}
    return _run(cfg, "etk.faithfulness_curve/v1", body, needs_circuit=False)


def run_circuit_search(cfg: DictConfig) -> dict[str, Any]:
    """Position-aware circuit search (etk.methods.circuit_eval.search): score (role, head) units, grow and prune to
    `method.target` faithfulness on a search split, report faithfulness on held-out prompts."""
    from etk.data.roles import ROLE_VOCAB
    from etk.methods.circuit_eval.ablation import Ablation, ceiling_ablation, full_model
    from etk.methods.circuit_eval.faithfulness import random_ablation, summarise
    from etk.methods.circuit_eval.search import (
        UnitAttribution,
        circuit_from_keep,
        exact_removal_effects,
        grow_and_prune,
        verify_subset,
    )
    from etk.report.plots import role_head_heatmap

    m = cfg.method
    nb = int(cfg.data.n_boxes)
    n_search = -(-int(m.n_search) // nb) * nb  # whole contexts, so the held-out split shares none

    def body(ev, _):
        dims, t0 = ev.dims, time.time()
        full = full_model(dims)
        acc_model = float(ev([full]).mean())
        if acc_model == 0:
            print(f"[etk] circuit search on {cfg.model.name}: the model answers none of the {n_search} search prompts, "
                  "so there is nothing for a circuit to explain")
            return {"faithfulness": None, "reason": "the model answers no search prompt correctly", "units_kept": 0,
                    "unit_fraction": None, "heads_per_role": {}, "accuracy_model": 0.0}
        # roles that occur in these prompts: the unit space
        ev.use(n_search, batch_size=int(m.attribution_batch_size))
        attr_loader = ev.loader
        attr_trainer = L.Trainer(**{**trainer_kwargs(cfg), "logger": False, "inference_mode": False})

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
                                               int(m.prune_rounds))
        t_search = time.time() - t0 - t_score
        verification = None
        if method == "attribution" and int(m.n_verify) > 0:
            sub = verify_subset(order, scores, int(m.n_verify), int(m.random_seed))
            ev.use(min(n_search, int(m.verify_prompts)))
            lp = lambda a: (ev(a), ev.logp())[1]  # noqa: E731
            from_model = exact_removal_effects(lp, full, sub, shape)
            in_circuit = [u for u in sub if keep.view(-1)[u]]
            from_circ = exact_removal_effects(lp, Ablation(keep), in_circuit, shape) if in_circuit else torch.zeros(0)
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
        # held-out prompts: faithfulness with CI, the three-position ceiling, random circuits of the same sizes
        ev.use(int(m.n_heldout), start=n_search)
        circ = Ablation(keep, "circuit")
        rng = random.Random(int(m.random_seed))
        rand = [random_ablation(circ, dims, rng, f"random{i}") for i in range(int(m.n_random))]
        c = ev([full, circ, ceiling_ablation(dims)] + rand)
        doc = summarise(c[0], c[1], c[2], c[3:], circ.heads_per_role(), False, int(m.n_bootstrap),
                        {"n_draws": int(m.n_random), "seed": int(m.random_seed)})
        kept = int(keep.sum())
        circuit = circuit_from_keep(keep, {"model": cfg.model.name, "kind": "position_aware", "target": float(m.target),
                                           "scoring": method, "faithfulness_heldout": doc["faithfulness"]})
        circuit.save(output_dir() / "circuit.json")
        role_head_heatmap(keep, present, output_dir() / "circuit.png", f"{cfg.model.name}: position-aware circuit")
        print(f"[etk] circuit search on {cfg.model.name}: {kept} of {n_units} units ({100 * kept / n_units:.1f}%), "
              f"faithfulness {fmt(doc['faithfulness'])} [{fmt(doc['ci_low'])}, {fmt(doc['ci_high'])}] on "
              f"{doc['n']} held-out prompts (search split {f_search:.3f}, target {float(m.target)}); three-position "
              f"ceiling {fmt(doc['ceiling']['faithfulness'])}; random circuits {fmt(doc['random']['faithfulness_mean'])}"
              + (f"; attribution vs exact Spearman {fmt(verification['spearman_vs_removal_from_model'], 2)}"
                 if verification else ""))
        return {"faithfulness": doc["faithfulness"], "ci_low": doc["ci_low"], "ci_high": doc["ci_high"],
                "ceiling": doc["ceiling"], "relative_to_ceiling": doc["relative_to_ceiling"],
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
    return _run(cfg, "etk.circuit_search/v1", body, needs_circuit=False)


def minimality_jobs(study):
    """The paper's construction: each member's candidates pruned at its model's threshold
    (`discovery.minimality_threshold`); the pruned circuit is what later steps use."""
    from etk.methods.study.run import Job

    for m in study.members:
        threshold = (study.member(m).get("discovery") or {}).get("minimality_threshold", 0.01)
        yield Job(m, [f"model={m}", f"circuit.path={study.dir('path_patching', m) / 'circuit.json'}",
                      f"method.threshold={threshold}", *study.sizes("minimality"), *study.ablation()])


def faithfulness_jobs(study):
    """Each member's circuit on each member: the cross-model faithfulness matrix."""
    from etk.methods.study.run import Job

    for c in study.members:
        for m in study.members:
            yield Job(f"{c}_circuit-on-{m}", [f"model={m}", f"circuit.path={study.circuit_path(c)}",
                                               *study.sizes("faithfulness"), *study.ablation()])


def curve_jobs(study):
    """Each member's curve from its own path-patching scores."""
    from etk.methods.study.run import Job

    return [Job(m, [f"model={m}", f"scores={study.dir('path_patching', m)}", *study.sizes("faithfulness_curve"),
                    *study.ablation()]) for m in study.members]


def search_jobs(study):
    """Each member's position-aware circuit."""
    return study.per_member("circuit_search", *study.ablation())
