"""`method=faithfulness_curve`: faithfulness of each group's top-x% heads by path-patching score, x over
`method.fractions`, with CIs, CPR/CMD (MIB's measures), curve.json and curve.png."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from omegaconf import DictConfig

from etk.artifacts import write_json
from etk.circuits import load_score_map
from etk.errors import ConfigError
from etk.methods.faithfulness_curve.curve import curve_circuits, curve_points, integrated
from etk.methods.mean_ablation.ablation import all_heads_ablation, circuit_ablation, full_model
from etk.methods.mean_ablation.runner import run_evaluated
from etk.methods.mean_ablation.summary import random_ablation, summarise
from etk.metrics import fmt
from etk.models.loading import resolve_path
from etk.report.plots import curve_plot
from etk.results import CurveResult
from etk.runtime import output_dir
from etk.tasks import task_of


def pp_scores(run_dir: str | Path, groups) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The `groups`' score maps of a path-patching run (or a folder of `<group>.json` maps) and their masks of
    scored heads (all heads where the map does not record its reachable layers)."""
    root = resolve_path(str(run_dir))
    folder = root / "scores" if (root / "scores").is_dir() else root
    scores, scored = {}, {}
    for g in groups:
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


def run_faithfulness_curve(cfg: DictConfig) -> CurveResult:
    """Faithfulness of each group's top-x% heads, x over `method.fractions`, with CIs, CPR/CMD and curve.png."""
    m = cfg.method
    if not cfg.get("scores"):
        raise ConfigError("method=faithfulness_curve needs scores=<path-patching run dir>")
    scores, scored = pp_scores(cfg.scores, task_of(cfg).group_names)

    def body(ev, _):
        dims = ev.dims
        if next(iter(scores.values())).shape != (dims.n_layers, dims.n_heads):
            raise ConfigError(f"scores={cfg.scores} are {tuple(next(iter(scores.values())).shape)} maps but "
                             f"{cfg.model.name} has {dims.n_layers} layers x {dims.n_heads} heads")
        fr = sorted(float(x) for x in m.fractions)
        points = curve_circuits(scores, scored, fr)
        rng = random.Random(int(m.random_seed))
        abls = [full_model(dims), all_heads_ablation(dims, bool(m.ablate_non_vital), ev.vital)]
        circs = [circuit_ablation(c, dims, bool(m.ablate_non_vital), f"{x}", ev.vital) for x, c in points]
        rand = [[random_ablation(a, dims, rng, f"random{i}@{a.name}") for i in range(int(m.n_random))] for a in circs]
        correct = ev(abls + circs + [r for rs in rand for r in rs])  # one batch of every configuration
        model_c, ceil_c = correct[0], correct[1]
        nr = int(m.n_random)
        docs = [summarise(model_c, correct[2 + i], ceil_c, correct[2 + len(circs) + i * nr: 2 + len(circs) + (i + 1) * nr],
                          a.heads_per_role(), False, int(m.n_bootstrap)) for i, a in enumerate(circs)]
        pts = curve_points(fr, [c for _, c in points], docs)
        for p, d in zip(pts, docs):
            p["random_faithfulness_mean"] = d["random"]["faithfulness_mean"]
        reference = docs[0]["all_heads"]
        defined = all(p["faithfulness"] is not None for p in pts)
        area = integrated(fr, [p["faithfulness"] for p in pts]) if defined else {"cpr": None, "cmd": None}
        curve = {"model": cfg.model.name, "scores": str(cfg.scores), "points": pts, **area, "all_heads": reference,
                 "accuracy_model": docs[0]["accuracy_model"], "n": docs[0]["n"],
                 "ablate_non_vital": bool(m.ablate_non_vital)}
        if not defined:
            curve["reason"] = docs[0]["reason"]
        write_json(output_dir() / "curve.json", curve, "etk.curve/v1")
        curve_plot({cfg.model.name: curve}, output_dir() / "curve.png", f"{cfg.model.name}: faithfulness vs circuit size")
        print(f"[etk] faithfulness curve of {cfg.model.name}: " + ", ".join(
            f"{100 * p['fraction']:g}% {fmt(p['faithfulness'], 2)}" for p in pts)
              + f"; CPR {fmt(area['cpr'])}, CMD {fmt(area['cmd'])}; all heads {fmt(reference['faithfulness'])}")
        return {k: v for k, v in curve.items() if k != "model"}
    return run_evaluated(cfg, CurveResult, body, needs_circuit=False)
