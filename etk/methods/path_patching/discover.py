"""The stage loop of circuit discovery, shared by the runner and the benchmark: each stage's receivers are the
previous stage's top heads (q receivers: the heads; v receivers: their KV groups), its senders the heads of the
layers below the deepest receiver, and a caller-supplied `score` computes the stage's score map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from etk.circuits import top_k
from etk.errors import ConfigError
from etk.interventions.components import HeadId, all_heads
from etk.methods.path_patching.stages import Receivers, Stage, reachable_layers, receivers_from
from etk.models.arch import Dims

Score = Callable[[Stage, "Receivers | None", list[HeadId]], tuple[torch.Tensor, dict[str, Any]]]


@dataclass
class StageResult:
    group: str
    scores: torch.Tensor | None  # [layer, head]; None when skipped
    scored: torch.Tensor  # [layer, head] bool: the senders this stage could reach
    receivers: Receivers | None
    report: dict[str, Any] = field(default_factory=dict)


def discover(graph: dict[str, Stage], stages: Sequence[str], dims: Dims, receivers_top_k: dict[str, int],
             score: Score, all_heads_top_k: bool = False) -> list[StageResult]:
    """Run `stages` of the task's stage graph (`task_stages`) in order; `score(stage, receivers, senders)` returns
    the stage's [layer, head] scores and a report dict. A stage whose predecessor scored no sender is skipped (no
    receivers). `all_heads_top_k`: the paper's receivers, top-k over every head (unreachable senders' exact zeros
    included) instead of the reachable ones."""
    out: list[StageResult] = []
    prev: list[HeadId] | None = None
    for group in stages:
        if group not in graph:
            raise ConfigError(f"method.stages: {group!r} is not a stage of the task; its stages, in order: "
                              f"{', '.join(graph)}")
        stage = graph[group]
        if stage.receiver_site is not None and prev is None:
            raise ConfigError(f"stage {group!r} needs the previous stage's receivers; list the stages in order "
                              f"({', '.join(graph)})")
        empty = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.bool)
        if stage.receiver_site is not None and not prev:
            out.append(StageResult(group, None, empty, None, {"skipped": "no receivers"}))
            prev = []
            continue
        rec = None if stage.receiver_site is None else receivers_from(prev, stage.receiver_site, dims)
        reach = reachable_layers(stage, rec, dims.n_layers)
        senders = [h for h in all_heads(dims) if h.layer in reach]
        scores, report = score(stage, rec, senders)
        scored = empty.clone()
        scored[reach] = True
        report = {"receivers": None if rec is None else {"site": rec.site, "units": rec.units},
                  "n_senders_scored": len(senders), "n_senders_skipped": dims.n_layers * dims.n_heads - len(senders),
                  "reachable_layers": reach, **report}
        out.append(StageResult(group, scores, scored, rec, report))
        if group in receivers_top_k:
            prev = top_k(scores, int(receivers_top_k[group]), None if all_heads_top_k else scored)
    return out
