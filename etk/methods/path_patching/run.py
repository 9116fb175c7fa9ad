"""`method=path_patching`: score every sender of the task's stages, write score maps, heatmaps and circuit.json: the
candidate sets (each group's top candidates; of two groups at one role, the later's removed from the earlier's: PT
from VF for entity tracking, SPEC §2.5), which `method=minimality` prunes to the circuit."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from etk.interventions.components import HeadId
from omegaconf import DictConfig

from etk.artifacts import save_tensor
from etk.circuits import candidates, save_score_map, top_k
from etk.methods.path_patching.discover import discover
from etk.interventions.prefix import cache_budget
from etk.methods.path_patching.fast import StageRuns
from etk.methods.path_patching.module import PathPatchingModule
from etk.methods.path_patching.stages import discovery_schedule, pp_loader, task_stages
from etk.metrics import spearman
from etk.models.loading import load
from etk.report.plots import head_heatmap
from etk.results import PathPatchingResult
from etk.runtime import data_config, emit, make_trainer, output_dir, plain_config, run_device, run_logger
from etk.tasks import task_of


def rank_agreement(est: torch.Tensor, exact: torch.Tensor, k: int, mask: torch.Tensor) -> dict[str, float]:
    """Spearman correlation over the scored heads and overlap of the top-k (most negative) sets."""
    e, x = est[mask].double(), exact[mask].double()
    if e.numel() < 2:
        return {"spearman": None, f"top{k}_overlap": None}
    rho = spearman(e, x)
    ke, kx = set(torch.topk(-e, min(k, e.numel())).indices.tolist()), set(torch.topk(-x, min(k, x.numel())).indices.tolist())
    return {"spearman": rho, f"top{k}_overlap": len(ke & kx) / max(1, len(kx))}


def near_boundary(scores: torch.Tensor, ks: list[int | None], margin: float) -> list[HeadId]:
    """Heads whose score lies within `margin` x the largest |score| of the k-th score, for each top-k boundary k of
    `ks` (receivers, candidates): those a reduced-precision run could put on the wrong side of the cut."""
    flat = scores.flatten().double()
    finite = flat[torch.isfinite(flat)]
    if finite.numel() == 0:
        return []
    width = margin * float(finite.abs().max())
    ordered = finite.sort().values  # most negative (most important) first
    near = torch.zeros_like(flat, dtype=torch.bool)
    for k in ks:
        if k and 0 < k <= ordered.numel():
            cut = (float(ordered[k - 1]) + (float(ordered[k]) if k < ordered.numel() else float(ordered[k - 1]))) / 2
            near |= torch.isfinite(flat) & ((flat - cut).abs() <= width)
    n_heads = scores.shape[1]
    return [HeadId(int(i) // n_heads, int(i) % n_heads) for i in near.nonzero()[:, 0].tolist()]


def run_path_patching(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.method
    L.seed_everything(cfg.seed, verbose=False)
    out = output_dir()
    task = task_of(cfg)
    short = task.short
    model = load(cfg.model, run_device(cfg))
    dims = model.arch.dims
    schedule = discovery_schedule(m, cfg.model, dims, task)
    seed = int(m.seed if m.get("seed") is not None else (cfg.model.get("discovery") or {}).get("seed", 20))
    data_cfg = data_config(cfg, m.n_examples)
    examples = task.examples(data_cfg, model.tokenizer)
    loader = pp_loader(task, model.tokenizer, examples, seed, int(m.batch_size), data_cfg.padding_side)
    # the paper's code: top-k over every head, exact zeros included (D11), and the Structure Reader's corrupt label
    # drawn anew per (prompt, sender) (D1)
    paper = bool(m.get("paper_compat", False))
    with run_logger(cfg) as logger:
        kw = {"inference_mode": m.algorithm != "attribution"}
        trainer = make_trainer(cfg, "path patching: prompt batches", **kw)
        runs = [m.algorithm] + (["fast"] if m.algorithm == "attribution" and m.compare_exact else [])
        by_alg: dict[str, dict[str, torch.Tensor]] = {}

        def score(stage, rec, senders):
            """Every algorithm of the run on this stage, as Lightning predict loops; the exact scores pass on."""
            report, scores = {}, {}
            for alg in runs:
                module = PathPatchingModule(model.cfg, stage, rec, senders, alg, m.chunk_rows, m.suffix_chunk_rows, model,
                                            seed if paper else None, reference=bool(m.get("reference", False)),
                                            runs=shared)
                t0 = time.time()
                trainer.predict(module, loader, return_predictions=False)
                report[alg] = {"wall_s": round(time.time() - t0, 3), **module.total_cost()}
                scores[alg] = module.scores()
            exact = scores.get("fast", scores.get("naive"))
            if exact is not None and torch.get_float32_matmul_precision() != "highest":
                near = near_boundary(exact, [schedule["receivers_top_k"].get(stage.group), schedule["candidates_top_k"].get(stage.group)],
                                     float(m.get("rescore_margin", 0.05)))
                near = [h for h in near if h in set(senders)]
                if near:  # the heads whose rank TF32 rounding could flip, scored again in exact fp32
                    module = PathPatchingModule(model.cfg, stage, rec, near, "fast", m.chunk_rows, m.suffix_chunk_rows,
                                                model, seed if paper else None)
                    saved = torch.get_float32_matmul_precision()
                    torch.set_float32_matmul_precision("highest")
                    try:
                        trainer.predict(module, loader, return_predictions=False)
                    finally:
                        torch.set_float32_matmul_precision(saved)
                    fp32 = module.scores()
                    idx = (torch.tensor([h.layer for h in near]), torch.tensor([h.head for h in near]))
                    exact = exact.clone()
                    exact[idx] = fp32[idx]
                    scores["fast" if "fast" in scores else "naive"] = exact
                report["rescored_in_fp32"] = [list(h) for h in near]
            by_alg[stage.group] = scores
            return (exact if exact is not None else scores["attribution"]), report

        graph = task_stages(task)
        # one clean and one corrupt forward per batch for every stage (the re-score above runs its own, in fp32)
        shared = StageRuns([graph[g] for g in (m.stages or graph) if g in graph], cache_budget(m.get("cache_mb", "auto")))
        results = discover(graph, list(m.stages or graph), dims, schedule["receivers_top_k"], score, paper)
        reports: dict[str, Any] = {}
        for r in results:
            group = r.group
            reports[group] = r.report
            if r.scores is None:
                print(f"[etk] {short[group]}: skipped, the previous stage scored no sender (no receivers)")
                continue
            scores, chosen = by_alg[group], r.scores
            if "attribution" in scores and len(scores) > 1:
                k = schedule["candidates_top_k"][group]
                r.report["attribution_vs_exact"] = rank_agreement(scores["attribution"], chosen, k, r.scored)
            for alg, s in scores.items():
                suffix = "" if s is chosen else f".{alg}"
                save_score_map(out / "scores" / f"{group}{suffix}.json", s, algorithm=alg, exact=alg != "attribution",
                               model=cfg.model.name, reachable_layers=r.report["reachable_layers"])
                save_tensor({"scores": s, "axes": ("layer", "head"), "algorithm": alg}, out / "scores" / f"{group}{suffix}.pt")
            top = top_k(chosen, schedule["candidates_top_k"][group], None if paper else r.scored)
            head_heatmap(chosen, out / "heatmaps" / f"{group}.png",
                         f"{cfg.model.name}: {short[group]} path-patching scores", top)
            walls = ", ".join(f"{a} {r.report[a]['wall_s']:.1f}s" for a in runs)
            print(f"[etk] {short[group]}: top {[tuple(h) for h in top[:5]]} ({walls})")
        chosen_scores = {r.group: r.scores for r in results if r.scores is not None}
        scored = {r.group: r.scored for r in results if r.scores is not None}
        meta = {"model": cfg.model.name, "kind": "candidates", "seed": seed, "n_examples": len(examples),
                "algorithm": m.algorithm, "exact": m.algorithm != "attribution" or bool(m.compare_exact),
                "schedule": schedule, **task.prompt_meta(cfg.data)}
        cand = candidates(chosen_scores, schedule["candidates_top_k"], None if paper else scored, meta)
        cand.save(out / "circuit.json")
        payload = {"model": cfg.model.name, "stages": reports, "schedule": schedule, "seed": seed,
                   "circuit": {g: [list(h) for h in hs] for g, hs in cand.groups.items()}, "config": plain_config(cfg)}
        return emit(PathPatchingResult.from_payload(payload), logger)
