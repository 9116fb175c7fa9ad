"""Circuits: head sets keyed by a task's groups (each acting at its position role: the paper's four for entity
tracking) or by any position role (`etk.data.roles.ROLE_VOCAB`: position-aware circuits), JSON I/O (the paper's schema), score maps, candidates.

One definition shared by path patching, circuit evaluation, circuit search, DCM and CMAP."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from etk.data.roles import ROLE_ID, ROLE_VOCAB
from etk.errors import ConfigError, DataError, EtkError
from etk.interventions.components import HeadId
from etk.interventions.heads import HeadSet
from etk.tasks import all_groups, task_with_groups
from etk.tasks import group_role as key_role

PAPER_CIRCUITS = {"llama_7b": "llama_7b.json", "goat_7b": "goat_7b.json", "float_7b": "float_7b.json"}


class CircuitError(EtkError, ValueError):
    """A circuit file or entry that etk cannot use."""


@dataclass
class Circuit:
    """Head sets in order (paper files list heads in minimality/candidate order) plus free-form metadata.

    Keys are a task's groups (`value_fetcher` ... `struct_reader`, each acting at its role) or position roles
    (`last`, `correct_object`, `objects[3]`, `sep`, ...: the units of a position-aware circuit)."""

    groups: dict[str, list[HeadId]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = all_groups()
        unknown = [k for k in self.groups if k not in groups and k not in ROLE_ID]
        if unknown:
            from etk.tasks import TASKS

            raise CircuitError(f"unknown circuit keys {unknown}: keys are a task's groups ("
                               + "; ".join(f"{t.name}: {', '.join(t.group_names)}" for t in TASKS.values())
                               + ") or position roles (last, query_label, correct_object, objects[k], S2, ...)")
        self.groups = {g: [HeadId(int(lh[0]), int(lh[1])) for lh in hs] for g, hs in self.groups.items()}

    def units(self) -> list[tuple[str, int, int]]:
        """(role, layer, head) units without duplicates (VF and PT share `last`), in key order."""
        out: list[tuple[str, int, int]] = []
        seen: set[tuple[str, int, int]] = set()
        for key, heads in self.groups.items():
            for layer, head in heads:
                u = (key_role(key), int(layer), int(head))
                if u not in seen:
                    seen.add(u)
                    out.append(u)
        return out

    def roles(self) -> list[str]:
        """The position roles the circuit's entries act at, in order of first appearance."""
        return list(dict.fromkeys(key_role(k) for k in self.groups))

    def head_set(self, keys: list[str] | None = None) -> HeadSet:
        """The circuit as a head set (role -> heads; VF and PT merged at `last`), of all entries or of `keys`: the
        one head-set type every intervention takes."""
        return HeadSet.from_circuit(self, keys)

    def heads_at(self, role: str) -> list[HeadId]:
        """Heads acting at a position role (VF and PT share `last`), without duplicates, in entry order."""
        return self.head_set().heads(role)

    def sizes(self) -> dict[str, int]:
        """Heads per paper group, or per role for a position-aware circuit."""
        if self.is_paper_form():
            return {g: len(self.groups.get(g, [])) for g in self.group_order()}
        return {r: len(self.heads_at(r)) for r in self.roles()}

    def is_paper_form(self) -> bool:
        """Only group keys (of one task)."""
        groups = all_groups()
        return all(k in groups for k in self.groups)

    def group_order(self) -> tuple[str, ...]:
        """The groups of the task the circuit's group keys belong to, in the circuit's order (none: ())."""
        task = task_with_groups(self.groups)
        return task.group_names if task is not None else ()

    # -- circuit algebra: per entry (group or role), heads compared by (layer, head); order kept from `self` --------
    def intersect(self, other: "Circuit") -> "Circuit":
        """The heads of each entry that `other` also has there (the shared circuit)."""
        return self._combine(other, lambda mine, theirs: [h for h in mine if h in theirs], "intersect")

    def minus(self, other: "Circuit") -> "Circuit":
        """The heads of each entry that `other` does not have there (e.g. the heads a fine-tune adds)."""
        return self._combine(other, lambda mine, theirs: [h for h in mine if h not in theirs], "minus")

    def union(self, other: "Circuit") -> "Circuit":
        """Every head of either circuit, per entry (this circuit's order, then `other`'s new heads)."""
        return self._combine(other, lambda mine, theirs: mine + [h for h in theirs if h not in mine], "union",
                             keys=list(dict.fromkeys([*self.groups, *other.groups])))

    def _combine(self, other: "Circuit", op, name: str, keys: list[str] | None = None) -> "Circuit":
        keys = list(self.groups) if keys is None else keys
        groups = {k: op(list(self.groups.get(k, [])), list(other.groups.get(k, []))) for k in keys}
        return Circuit(groups, {"algebra": name, "a": self.meta.get("model"), "b": other.meta.get("model")})

    def to_json(self) -> dict[str, Any]:
        groups = self.group_order()
        order = [g for g in groups if g in self.groups] + sorted((k for k in self.groups if k not in groups),
                                                                 key=lambda k: ROLE_VOCAB.index(k))
        doc: dict[str, Any] = {g: [list(h) for h in self.groups[g]] for g in order}
        if self.meta:
            doc["meta"] = self.meta
        return doc

    def save(self, path: str | Path) -> Path:
        """The paper's schema, one entry a line, written atomically."""
        from etk.artifacts import finite, write_text

        lines = [f"  {json.dumps(k)}: {json.dumps(finite(v), allow_nan=False)}" for k, v in self.to_json().items()]
        return write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")


def load_circuit(spec: str | Path) -> Circuit:
    """A circuit by config name (`llama_7b`, `goat_7b`, `float_7b`: the paper's, shipped) or by JSON path."""
    if str(spec) in PAPER_CIRCUITS:
        text = resources.files("etk.data").joinpath("circuits", PAPER_CIRCUITS[str(spec)]).read_text()
    else:
        from etk.models.loading import resolve_path

        p = resolve_path(str(spec))
        if not p.exists():
            raise CircuitError(f"circuit {spec!r}: neither a shipped circuit {sorted(PAPER_CIRCUITS)} nor a file")
        text = p.read_text()
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise CircuitError("a circuit file holds one JSON object {key: [[layer, head], ...]}")
        meta = doc.pop("meta", {})
        for k, v in doc.items():
            if not isinstance(v, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) for x in h)
                                                  for h in v):
                raise CircuitError(f"entry {k!r} must be a list of [layer, head] integer pairs")
        return Circuit(doc, meta)
    except (json.JSONDecodeError, CircuitError) as e:
        raise CircuitError(f"circuit {spec!r}: {e}") from None


def circuit_spec(cfg: Any, fallback: str | None = None) -> str | None:
    """The selected circuit: `circuit.path` (any circuit.json), else the `circuit=` option's shipped name, else
    `fallback` (e.g. the fine-tuned member's own circuit)."""
    c = cfg.get("circuit")
    spec = (c.get("path") or c.get("name")) if c else None
    return str(spec) if spec else fallback


def resolve_circuit(cfg: Any, fallback: str | None = None) -> tuple[str, "Circuit"]:
    """(spec, Circuit) of the run's circuit (`circuit_spec`): the one resolver every method uses; a clear error when
    there is none, or when its groups are another task's."""
    from etk.tasks import check_groups_of, task_of

    spec = circuit_spec(cfg, fallback)
    if not spec:
        raise ConfigError("this method needs a circuit: circuit=<llama_7b|goat_7b|float_7b> (the paper's) or "
                          "circuit.path=<circuit.json> (e.g. a path-patching or minimality run's)")
    circuit = load_circuit(spec)
    check_groups_of(task_of(cfg), circuit.groups, f"circuit {spec}")
    return spec, circuit


def save_score_map(path: str | Path, scores: torch.Tensor, **meta: Any) -> Path:
    """A [layer, head] score tensor as JSON (the paper-repo schema, plus metadata)."""
    from etk.artifacts import finite, write_text

    doc = {"shape": list(scores.shape), "axes": ["layer", "head"], "scores": scores.tolist(), **meta}
    return write_text(path, json.dumps(finite(doc), allow_nan=False))


def load_score_map(path: str | Path) -> torch.Tensor:
    doc = json.loads(Path(path).read_text())
    if doc.get("axes") != ["layer", "head"]:
        raise DataError(f"{path}: expected axes ['layer', 'head'], found {doc.get('axes')}")
    rows = [[float("nan") if v is None else v for v in row] for row in doc["scores"]]  # null = undefined score
    t = torch.tensor(rows, dtype=torch.float32)
    if list(t.shape) != list(doc["shape"]):
        raise DataError(f"{path}: scores do not match the declared shape {doc['shape']}")
    return t


def top_k(scores: torch.Tensor, k: int, scored: torch.Tensor | None = None) -> list[HeadId]:
    """The k most negative scores (most important), most important first; only heads in the `scored` mask
    [layer, head] are candidates (unreachable senders and undefined (NaN) scores are never picked)."""
    n_heads = scores.shape[1]
    flat = scores.flatten().double().nan_to_num(nan=float("inf"), posinf=float("inf"))
    if scored is not None:
        flat = torch.where(scored.flatten(), flat, torch.full_like(flat, float("inf")))
    k = min(k, int(torch.isfinite(flat).sum()))
    idx = torch.topk(flat, k, largest=False).indices
    return [HeadId(int(i) // n_heads, int(i) % n_heads) for i in idx]


def candidates(scores: dict[str, torch.Tensor], sizes: dict[str, int],
               scored: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None) -> Circuit:
    """The paper's candidate sets (SPEC §2.5): each group's top-k heads by path-patching score (most negative first),
    then, of two groups acting at one role, the later group's candidates removed from the earlier's (entity tracking:
    PT's from VF, both at `last`). `scored` masks [layer, head] exclude unreachable senders; groups without scores
    are left out."""
    groups = {g: top_k(scores[g], int(sizes[g]), None if scored is None else scored.get(g))
              for g in in_task_order(scores) if g in sizes}
    return Circuit(exclusive_at_shared_roles(groups), dict(meta or {}))


def in_task_order(groups) -> list[str]:
    """The keys of `groups` in the order of their task's groups (other keys after, as given)."""
    task = task_with_groups(groups)
    order = [g for g in task.group_names if g in groups] if task is not None else []
    return order + [g for g in groups if g not in order]


def exclusive_at_shared_roles(groups: dict[str, list]) -> dict[str, list]:
    """Of two groups acting at one role, the later group's heads removed from the earlier's (entity tracking: PT's
    from VF, both at `last`), so that each head at a role belongs to one group. `groups` in task order."""
    out = {g: list(hs) for g, hs in groups.items()}
    names = list(out)
    for i, early in enumerate(names):
        for late in names[i + 1:]:
            if key_role(early) == key_role(late):
                taken = set(out[late])
                out[early] = [h for h in out[early] if h not in taken]
    return out


def circuit_label(spec: str | Path, circuit: Circuit) -> str:
    """A short name for tables: the shipped name, or the model the circuit was discovered on."""
    if str(spec) in PAPER_CIRCUITS:
        return str(spec)
    return str(circuit.meta.get("model") or Path(spec).stem)


def overlap(a: Circuit, b: Circuit) -> dict[str, dict[str, float | None]]:
    """Per entry (the paper's four groups, or every role of position-aware circuits): |A ∩ B|, precision
    |A ∩ B|/|A| and recall |A ∩ B|/|B| (heads compared by (layer, head); None for an empty side)."""
    groups = a.group_order() or b.group_order()
    keys = list(groups) if a.is_paper_form() and b.is_paper_form() else sorted(
        set(a.groups) | set(b.groups), key=lambda k: (k not in groups, ROLE_VOCAB.index(k) if k in ROLE_ID else 0))
    out = {}
    for g in keys:
        A, B = set(a.groups.get(g, [])), set(b.groups.get(g, []))
        n = len(A & B)
        out[g] = {"shared": n, "size_a": len(A), "size_b": len(B), "precision": n / len(A) if A else None,
                  "recall": n / len(B) if B else None}
    return out


@dataclass(frozen=True)
class DCMSelection:
    """The heads a DCM run selected for one group and desideratum (the one parser of every form they come in)."""

    heads: list[HeadId]
    group: str | None = None
    desideratum: str | None = None
    test_accuracy: float | None = None


def load_dcm_selection(spec: str | Path) -> DCMSelection:
    """A DCM head selection: an etk DCM run (its folder or results.json), its selected_heads.json, or the paper's
    `<circuit>__<group>__<desideratum>__0.01.txt` ("Heads: [[l, h], ...]" then "Test Accuracy: x"; shipped in
    etk/data/dcm). An empty selection is an empty list, never replaced."""
    from etk.models.loading import resolve_path
    from etk.results import DCMResult

    p = resolve_path(str(spec))
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise CircuitError(f"DCM head selection {spec!r}: no such file ({p})")
    text = p.read_text()
    if p.suffix == ".json":
        doc = json.loads(text)
        if doc.get("schema") == DCMResult.schema:
            res = DCMResult.from_record(doc, p)
            return DCMSelection([HeadId(int(a), int(b)) for a, b in res.selected_heads], res.group, res.desideratum,
                                res.test.get("accuracy"))
        if doc.get("heads") is None:
            raise CircuitError(f"{p}: neither a DCM result (schema {DCMResult.schema}) nor a selected_heads.json")
        return DCMSelection([HeadId(int(a), int(b)) for a, b in doc["heads"]], doc.get("group"), doc.get("desideratum"))
    lines = dict(line.split(": ", 1) for line in text.strip().splitlines() if ": " in line)
    if "Heads" not in lines:
        raise CircuitError(f"{p}: expected a line 'Heads: [[layer, head], ...]' (the paper's DCM output)")
    acc = lines.get("Test Accuracy")
    parts = p.stem.split("__")  # <circuit>__<group>__<desideratum>__<threshold>
    return DCMSelection([HeadId(int(a), int(b)) for a, b in json.loads(lines["Heads"])],
                        parts[1] if len(parts) == 4 else None, parts[2] if len(parts) == 4 else None,
                        float(acc) if acc else None)
