"""`method=overlap`: the heads two circuits share, per group (or per role), with precision and recall."""

from __future__ import annotations

from omegaconf import DictConfig

from etk.circuits import load_circuit, overlap, resolve_circuit
from etk.errors import ConfigError
from etk.metrics import fmt
from etk.results import OverlapResult
from etk.runtime import emit, plain_config


def run_overlap(cfg: DictConfig) -> OverlapResult:
    spec_a, a = resolve_circuit(cfg)
    if not cfg.method.get("other"):
        raise ConfigError("method=overlap needs method.other=<circuit name or path>")
    b = load_circuit(str(cfg.method.other))
    res = overlap(a, b)
    for g, v in res.items():  # a group empty on one side has no precision or recall: n/a, never an error
        print(f"[etk] {g}: shared {v['shared']} (precision {fmt(v['precision'], 2)}, recall {fmt(v['recall'], 2)})")
    return emit(OverlapResult.from_payload({"a": spec_a, "b": str(cfg.method.other), "overlap": res,
                                            "config": plain_config(cfg)}))
