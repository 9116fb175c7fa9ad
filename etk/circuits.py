"""Circuits: the four head groups, the position role each acts at, JSON I/O (the paper's schema), score maps.

One definition shared by path patching, circuit evaluation, DCM and CMAP."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from etk.interventions.components import HeadId

GROUPS: tuple[str, ...] = ("value_fetcher", "pos_transmitter", "pos_detector", "struct_reader")
SHORT = {"value_fetcher": "VF", "pos_transmitter": "PT", "pos_detector": "PD", "struct_reader": "SR"}
GROUP_ROLE: dict[str, str] = {
    "value_fetcher": "last",
    "pos_transmitter": "last",
    "pos_detector": "query_label",
    "struct_reader": "prev_query_label",
}
PAPER_CIRCUITS = {"llama_7b": "llama_7b.json", "goat_7b": "goat_7b.json", "float_7b": "float_7b.json"}


@dataclass
class Circuit:
    """Head groups in order (paper files list heads in minimality/candidate order) plus free-form metadata."""

    groups: dict[str, list[HeadId]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown circuit groups {sorted(unknown)}; groups are {GROUPS}")
        self.groups = {g: [HeadId(int(lh[0]), int(lh[1])) for lh in hs] for g, hs in self.groups.items()}

    def heads_at(self, role: str) -> list[HeadId]:
        """Heads acting at a position role (VF and PT share `last`), without duplicates, in group order."""
        out: list[HeadId] = []
        for g in GROUPS:
            if GROUP_ROLE[g] == role:
                out += [h for h in self.groups.get(g, []) if h not in out]
        return out

    def sizes(self) -> dict[str, int]:
        return {g: len(self.groups.get(g, [])) for g in GROUPS}

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {g: [list(h) for h in self.groups[g]] for g in GROUPS if g in self.groups}
        if self.meta:
            doc["meta"] = self.meta
        return doc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = self.to_json()
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()]
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        return path


def load_circuit(spec: str | Path) -> Circuit:
    """A circuit by config name (`llama_7b`, `goat_7b`, `float_7b`: the paper's, shipped) or by JSON path."""
    if str(spec) in PAPER_CIRCUITS:
        text = resources.files("etk.data").joinpath("circuits", PAPER_CIRCUITS[str(spec)]).read_text()
    else:
        from etk.models.loading import resolve_path

        p = resolve_path(str(spec))
        if not p.exists():
            raise FileNotFoundError(f"circuit {spec!r}: neither a shipped circuit {sorted(PAPER_CIRCUITS)} nor a file")
        text = p.read_text()
    doc = json.loads(text)
    meta = doc.pop("meta", {})
    return Circuit({g: doc[g] for g in GROUPS if g in doc}, meta)


def save_score_map(path: str | Path, scores: torch.Tensor, **meta: Any) -> Path:
    """A [layer, head] score tensor as JSON (the paper-repo schema, plus metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"shape": list(scores.shape), "axes": ["layer", "head"], "scores": scores.tolist(), **meta}
    path.write_text(json.dumps(doc))
    return path


def load_score_map(path: str | Path) -> torch.Tensor:
    doc = json.loads(Path(path).read_text())
    if doc.get("axes") != ["layer", "head"]:
        raise ValueError(f"{path}: expected axes ['layer', 'head'], found {doc.get('axes')}")
    t = torch.tensor(doc["scores"], dtype=torch.float32)
    if list(t.shape) != list(doc["shape"]):
        raise ValueError(f"{path}: scores do not match the declared shape {doc['shape']}")
    return t


def top_k(scores: torch.Tensor, k: int, scored: torch.Tensor | None = None) -> list[HeadId]:
    """The k most negative scores (most important), most important first; only heads in the `scored` mask
    [layer, head] are candidates (unreachable senders are never picked)."""
    n_heads = scores.shape[1]
    flat = scores.flatten().double()
    if scored is not None:
        flat = torch.where(scored.flatten(), flat, torch.full_like(flat, float("inf")))
    k = min(k, int(torch.isfinite(flat).sum()))
    idx = torch.topk(flat, k, largest=False).indices
    return [HeadId(int(i) // n_heads, int(i) % n_heads) for i in idx]


def circuit_label(spec: str | Path, circuit: Circuit) -> str:
    """A short name for tables: the shipped name, or the model the circuit was discovered on."""
    if str(spec) in PAPER_CIRCUITS:
        return str(spec)
    return str(circuit.meta.get("model") or Path(spec).stem)


def overlap(a: Circuit, b: Circuit) -> dict[str, dict[str, float]]:
    """Per group: |A ∩ B|, precision |A ∩ B|/|A| and recall |A ∩ B|/|B| (heads compared by (layer, head))."""
    out = {}
    for g in GROUPS:
        A, B = set(a.groups.get(g, [])), set(b.groups.get(g, []))
        n = len(A & B)
        out[g] = {"shared": n, "precision": n / len(A) if A else float("nan"), "recall": n / len(B) if B else float("nan")}
    return out
