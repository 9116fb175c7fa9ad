"""Typed results: one dataclass per method, its schema string defined once (the class attribute `schema`).

Every runner returns one of these; every consumer — the study's report sections, the multirun collectors, CMAP reading
DCM selections, activation patching reading head sets, `etk.load_result` — reads these types, never a results.json
by key. A result declares as fields what its consumers read (nested records are `TypedDict`s); whatever else a method
records travels in `extra` and is written back unchanged, so `results.json` keeps its full content.

    res = FaithfulnessResult.load(run_dir)      # DataError when the file is missing, invalid or of another schema
    res.faithfulness, res.ci_low, res.all_heads["faithfulness"]
    res.save(other_dir)                         # atomic, NaN-free JSON: {"schema": ..., **fields, **extra}
    res.log(logger)                             # headline scalars, tables and figures, the same way for every method
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from etk.artifacts import read_json, write_json
from etk.errors import DataError

RESULTS_FILE = "results.json"


class AccuracyCI(TypedDict):
    """Accuracy with its 95% interval (`etk.metrics.accuracy_ci`)."""

    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


def _optional() -> Any:
    """A field written only when set (absent from results.json when None, as the runners always did)."""
    return field(default=None, metadata={"omit_none": True})


RENAMED_KEYS = {  # results.json keys of earlier etk versions -> today's (the "ceiling" was not one: circuits exceed it)
    "ceiling": "all_heads", "relative_to_ceiling": "relative_to_all_heads",
    "reason_relative_to_ceiling": "reason_relative_to_all_heads",
}


@dataclass(kw_only=True)
class Result:
    """What every method's result has: the resolved config, the run's resources, the rest of its record (`extra`)
    and, once saved or loaded, the folder it lives in (`dir`)."""

    schema: ClassVar[str] = ""
    method: ClassVar[str] = ""
    figures: ClassVar[tuple[str, ...]] = ()  # figure files, relative to the folder of results.json

    config: dict[str, Any] = field(default_factory=dict, repr=False)
    resources: dict[str, Any] | None = _optional()
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dir: Path | None = None

    # -- JSON ----------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "Result":
        """A result from a runner's record: declared keys become fields, the others go to `extra`."""
        known = set(cls.field_names())
        missing = [f.name for f in fields(cls) if f.name in known and f.default is MISSING
                   and f.default_factory is MISSING and f.name not in payload]
        if missing:
            raise DataError(f"a {cls.schema} result needs {missing}; the record has {sorted(payload)}")
        return cls(**{k: v for k, v in payload.items() if k in known},
                   extra={k: v for k, v in payload.items() if k not in known and k != "schema"})

    def to_json(self) -> dict[str, Any]:
        """The record: the method's fields, then `extra`, then the config and the resources."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("extra", "config", "resources") or (v is None and f.metadata.get("omit_none")):
                continue
            out[f.name] = v
        out.update(self.extra)
        out["config"] = self.config
        if self.resources is not None:
            out["resources"] = self.resources
        return out

    def save(self, folder: str | Path) -> Path:
        """`<folder>/results.json` with this result's schema, written atomically (rank 0 only)."""
        self.dir = Path(folder)
        return write_json(self.dir / RESULTS_FILE, self.to_json(), self.schema)

    @classmethod
    def load(cls, folder: str | Path) -> "Result":
        """The result a run wrote into `folder` (or the results.json path itself); a DataError naming the file when
        it is missing, not JSON, or of another schema."""
        path = results_path(folder)
        return cls.from_record(read_json(path, cls.schema), path)

    @classmethod
    def from_record(cls, doc: dict[str, Any], path: Path) -> "Result":
        """The result of a results.json already read (`doc`, checked to be of this schema) found at `path`; keys that
        earlier etk versions wrote under another name are read under today's (`RENAMED_KEYS`)."""
        res = cls.from_payload({RENAMED_KEYS.get(k, k): v for k, v in doc.items()})
        res.dir = path.parent
        return res

    # -- what a dashboard and a notebook show ----------------------------------------------------------------------
    def headline(self) -> dict[str, float]:
        """The scalars a logger plots: every top-level number of the result (None and NaN left out)."""
        out = {}
        for name in self.field_names():
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{self.method}/{name}"] = float(v)
        return out

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """Named tables (header, rows) of the result, for W&B tables and notebooks."""
        return {}

    def figure_paths(self) -> list[Path]:
        """The figure files this result wrote (those that exist)."""
        if self.dir is None:
            return []
        return [self.dir / f for f in self.figures if (self.dir / f).exists()]

    def plot(self):
        """The result's figure(s) (paths of the PNGs beside results.json); in a notebook, shown inline."""
        paths = self.figure_paths()
        try:
            from IPython.display import Image, display

            for p in paths:
                display(Image(filename=str(p)))
        except ImportError:
            pass
        return paths

    def log(self, logger) -> None:
        """Send the headline scalars, every table and every figure to a Lightning logger (W&B gets tables and
        images; loggers without them get the scalars)."""
        if logger is None:
            return
        if self.headline():
            logger.log_metrics(self.headline())
        if hasattr(logger, "log_table"):
            for name, (header, rows) in self.tables().items():
                logger.log_table(key=f"{self.method}/{name}", columns=list(header), data=[list(r) for r in rows])
        if hasattr(logger, "log_image"):
            for p in self.figure_paths():
                logger.log_image(key=f"{self.method}/{p.stem}", images=[str(p)])


@dataclass(frozen=True)
class Job:
    """One job of a study: which step ran it, its folder (`<run dir>/<step>/<name>`, written only, never parsed),
    its overrides, and what it ran on. Report sections and later steps find results by these fields."""

    step: str
    name: str
    overrides: tuple[str, ...] = ()
    member: str | None = None  # the pair member whose model the job runs on (None: the pair)
    circuit_of: str | None = None  # the member whose circuit (or DCM heads) the job uses
    group: str | None = None  # DCM / activation patching: the circuit group
    desideratum: str | None = None
    direction: str | None = None  # CMAP: forward (fine-tuned -> base) | reverse
    part: str | None = None  # SPLIT_PARTS: the part of the fine-tuned circuit it runs on (None: all of it)
    reads: tuple[tuple[str, str], ...] = ()  # (step, name) of the earlier jobs whose results it reads

    def matches(self, **fields: Any) -> bool:
        return all(getattr(self, k) == v for k, v in fields.items())


SPLIT_PARTS = ("shared", "added")  # the fine-tuned circuit's heads the base circuit has (per group), and the rest


def member_circuit(graph: list[tuple[Job, Result]], member: str) -> Path | None:
    """A pair member's circuit in a study's job graph: minimality's pruned circuit, else path patching's candidates
    (when the study skips minimality); None when neither step ran for it."""
    for step in ("minimality", "path_patching"):
        for job, res in graph:
            if job.step == step and job.member == member and res.dir is not None and (res.dir / "circuit.json").exists():
                return res.dir / "circuit.json"
    return None


def select(graph: list[tuple[Job, Result]], step: str, **match: Any) -> list[tuple[Job, Result]]:
    """The (job, result) pairs of a study's job graph from one step, in run order; `match` filters on Job fields."""
    return [(j, r) for j, r in graph if j.step == step and j.matches(**match)]


def results_path(folder: str | Path) -> Path:
    """`<folder>/results.json` (or `folder` itself when it names the file); a DataError when it does not exist."""
    path = Path(folder)
    path = path if path.suffix == ".json" else path / RESULTS_FILE
    if not path.exists():
        raise DataError(f"no {RESULTS_FILE} in {path.parent}: not an etk run folder, or the run did not finish "
                        "(rerun it)")
    return path


def load_result(folder: str | Path) -> Result:
    """Any run folder the CLI wrote (or its results.json), as its method's result type (found by its schema)."""
    path = results_path(folder)
    doc = read_json(path)
    cls = RESULT_TYPES.get(doc.get("schema"))
    if cls is None:
        raise DataError(f"{path}: unknown schema {doc.get('schema')!r}; known: {', '.join(sorted(RESULT_TYPES))}")
    return cls.from_record(doc, path)


# ------------------------------------------------------------------------------------------------------------------
# One class per method. Fields: what the report, the collectors and other methods read.


@dataclass(kw_only=True)
class EvalResult(Result):
    schema = "etk.eval/v1"
    method = "eval"
    model: str
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_boxes: int | None = _optional()  # entity tracking: the box count of the headline row
    by_n_boxes: list[dict[str, Any]] = field(default_factory=list)  # entity tracking: AccuracyCI + n_boxes per count
    logit_diff: dict[str, Any] | None = _optional()  # tasks with a distractor (IOI: IO - S): mean, ci_low, ci_high, n

    def tables(self):
        if not self.by_n_boxes:
            return {"accuracy": (["accuracy", "ci_low", "ci_high", "n"],
                                 [[self.accuracy, self.ci_low, self.ci_high, self.n]])}
        return {"accuracy": (["n_boxes", "accuracy", "ci_low", "ci_high", "n"],
                             [[r["n_boxes"], r["accuracy"], r["ci_low"], r["ci_high"], r["n"]] for r in self.by_n_boxes])}


@dataclass(kw_only=True)
class AttentionPatternsResult(Result):
    schema = "etk.attention_patterns/v1"
    method = "attention_patterns"
    model: str
    circuit: str
    n: int
    key_roles: list[str]  # the task's scalar roles, then `other`
    token_roles: list[str] = field(default_factory=list)  # the collapsed token roles the prompts have
    groups: dict[str, Any]  # group -> {role, group: {key role: mean_ci}, by_token_role: {role: mean_ci}, heads: [...]}

    def figure_paths(self) -> list[Path]:
        return [] if self.dir is None else sorted(self.dir.glob("attention_*.png"))

    def tables(self):
        rows = [[g, f"{h['head'][0]}.{h['head'][1]}", d["role"]] + [h[k]["mean"] for k in self.key_roles]
                for g, d in self.groups.items() for h in d["heads"]]
        return {"attention": (["group", "head", "from"] + self.key_roles, rows)}


@dataclass(kw_only=True)
class PositionalHypothesesResult(Result):
    schema = "etk.positional_hypotheses/v1"
    method = "positional_hypotheses"
    model: str
    group: str
    role: str
    heads: list[list[int]]
    random_heads: list[list[int]]
    hypotheses: list[str]
    probes: dict[str, Any]  # probe -> {n, disagreeing_pairs, hypotheses: {h: {row: AccuracyCI}}, base_answer: {...}}
    pooled: dict[str, Any]  # h -> {unpatched | selected | random: AccuracyCI} over the pairs that tell them apart
    n_pooled: int
    pairwise: dict[str, Any] = field(default_factory=dict)  # "a|b" -> {n, a: {row: AccuracyCI}, b: {...}} over the
    # pairs where a and b name different objects (the fair comparison of two hypotheses)

    def headline(self):
        return {f"pooled/{h}": v["selected"]["accuracy"] for h, v in self.pooled.items()
                if v["selected"]["accuracy"] is not None}

    def tables(self):
        return {"probes": (["probe", "hypothesis", "selected", "random", "unpatched", "n"],
                           [[p, h, v["selected"]["accuracy"], v["random"]["accuracy"], v["unpatched"]["accuracy"],
                             v["selected"]["n"]] for p, d in self.probes.items() for h, v in d["hypotheses"].items()])}


@dataclass(kw_only=True)
class CausalImpactResult(Result):
    schema = "etk.causal_impact/v1"
    method = "causal_impact"
    figures = ("causal_impact.png",)
    circuit: str
    base_circuit: str
    heads: list[dict[str, Any]]  # {group, head, finetuned_score, base_score, shared}
    groups: dict[str, Any]  # group -> {shared: {n, finetuned_mean, base_mean}, added: {...}}

    def tables(self):
        return {"heads": (["group", "head", "shared", "finetuned_score", "base_score"],
                          [[r["group"], f"{r['head'][0]}.{r['head'][1]}", r["shared"], r["finetuned_score"],
                            r["base_score"]] for r in self.heads])}


@dataclass(kw_only=True)
class SpecificityResult(Result):
    schema = "etk.specificity/v1"
    method = "specificity"
    model: str
    circuit: str
    circuit_task: str | None  # the task the circuit was found on
    n_heads: int
    accuracy_model: dict[str, Any]  # AccuracyCI of the intact model on the run's task
    accuracy_ablated: dict[str, Any]  # AccuracyCI with the circuit's heads ablated at every position
    random: dict[str, Any]  # mean accuracy (and 95% range) with random head sets of the same size ablated
    drop: float | None
    drop_random: float | None


@dataclass(kw_only=True)
class PathPatchingResult(Result):
    schema = "etk.path_patching/v1"
    method = "path_patching"
    model: str
    stages: dict[str, Any]  # group -> per-stage report (receivers, senders scored, cost, wall time)
    schedule: dict[str, Any]
    seed: int
    circuit: dict[str, list[list[int]]]  # the candidate sets written to circuit.json

    def figure_paths(self) -> list[Path]:
        """The heatmap of each stage, in stage order."""
        if self.dir is None:
            return []
        return [p for g in self.stages if (p := self.dir / "heatmaps" / f"{g}.png").exists()]

    def headline(self):
        """Each scored stage's wall time, of its exact algorithm where it ran one."""
        out = {}
        for g, report in self.stages.items():
            alg = next((a for a in ("fast", "naive", "attribution") if a in report), None)
            if alg is not None:
                out[f"path_patching/{g}/wall_s"] = float(report[alg]["wall_s"])
        return out

    def tables(self):
        out = {"candidates": (["group", "layer", "head", "rank"],
                              [[g, lh[0], lh[1], i] for g, hs in self.circuit.items() for i, lh in enumerate(hs)])}
        for g in self.stages:  # long format: one row per head, from the score maps beside results.json
            p = self.dir / "scores" / f"{g}.json" if self.dir is not None else None
            if p is not None and p.exists():
                rows = read_json(p)["scores"]
                out[f"{g}_scores"] = (["layer", "head", "score"],
                                      [[lay, h, v] for lay, row in enumerate(rows) for h, v in enumerate(row)])
        return out


@dataclass(kw_only=True)
class _CircuitRun(Result):
    """A method that evaluates one circuit on one model under mean ablation."""

    model: str
    circuit: str | None = _optional()  # short label: shipped name or the model it was discovered on
    circuit_spec: str | None = _optional()
    circuit_sizes: dict[str, int] | None = _optional()


@dataclass(kw_only=True)
class MinimalityResult(_CircuitRun):
    schema = "etk.minimality/v1"
    method = "minimality"
    mode: str
    threshold: float
    threshold_source: str | None = _optional()  # method.threshold | model.discovery.minimality_threshold | default
    groups: dict[str, Any]  # group -> {n, kept, evaluations, ...}
    pruned: dict[str, Any]  # the pruned circuit (circuit.json)

    def tables(self):
        return {"kept": (["group", "n", "kept"], [[g, v["n"], v.get("kept", 0)] for g, v in self.groups.items()])}


@dataclass(kw_only=True)
class FaithfulnessResult(_CircuitRun):
    schema = "etk.faithfulness/v1"
    method = "faithfulness"
    faithfulness: float | None
    ci_low: float | None
    ci_high: float | None
    accuracy_model: float
    accuracy_circuit: float
    all_heads: dict[str, Any]  # {accuracy, faithfulness}
    relative_to_all_heads: float | None
    random: dict[str, Any]  # random circuits: accuracy per draw, faithfulness_mean/sd, ci_low/ci_high
    n: int
    heads_per_role: dict[str, int]
    reason: str | None = _optional()

    def headline(self):
        out = super().headline()
        for k in ("faithfulness", "accuracy"):
            if self.all_heads.get(k) is not None:
                out[f"faithfulness/all_heads_{k}"] = float(self.all_heads[k])
        return out


@dataclass(kw_only=True)
class CompletenessResult(_CircuitRun):
    schema = "etk.completeness/v1"
    method = "completeness"
    random: dict[str, Any]
    groups: dict[str, Any]  # K = a whole group -> {K, size, F_C_minus_K, F_M_minus_K, incompleteness}
    named: dict[str, Any] = field(default_factory=dict)  # K = a named circuit's heads (method.k_circuits) -> the same
    n_random: int = 0  # random K drawn, each circuit unit in K with probability p
    p: float | None = None

    def tables(self):
        return {"groups": (["K", "size", "F_C_minus_K", "F_M_minus_K", "incompleteness"],
                           [[g, v.get("size"), v.get("F_C_minus_K"), v.get("F_M_minus_K"), v.get("incompleteness")]
                            for g, v in {**self.groups, **self.named}.items()])}


@dataclass(kw_only=True)
class CurveResult(Result):
    schema = "etk.faithfulness_curve/v1"
    method = "faithfulness_curve"
    figures = ("curve.png",)
    model: str
    scores: str
    points: list[dict[str, Any]]  # per fraction: {fraction, heads, faithfulness, ci_low, ci_high, ...}
    cpr: float | None
    cmd: float | None
    all_heads: dict[str, Any]
    accuracy_model: float
    n: int
    reason: str | None = _optional()

    def tables(self):
        return {"curve": (["fraction", "faithfulness", "ci_low", "ci_high"],
                          [[p["fraction"], p["faithfulness"], p.get("ci_low"), p.get("ci_high")] for p in self.points])}


@dataclass(kw_only=True)
class CircuitSearchResult(Result):
    schema = "etk.circuit_search/v1"
    method = "circuit_search"
    figures = ("circuit.png",)
    model: str
    faithfulness: float | None
    ci_low: float | None = _optional()
    ci_high: float | None = _optional()
    all_heads: dict[str, Any] | None = _optional()
    accuracy_model: float
    units_kept: int
    units_total: int | None = _optional()
    unit_fraction: float | None
    heads_per_role: dict[str, int]
    reason: str | None = _optional()

    def tables(self):
        return {"heads_per_role": (["role", "heads"], [[r, n] for r, n in self.heads_per_role.items()])}


@dataclass(kw_only=True)
class OverlapResult(Result):
    schema = "etk.overlap/v1"
    method = "overlap"
    a: str
    b: str
    overlap: dict[str, dict[str, Any]]  # group -> {shared, size_a, size_b, precision, recall}

    def tables(self):
        return {"overlap": (["group", "shared", "size_a", "size_b", "precision", "recall"],
                            [[g, v["shared"], v["size_a"], v["size_b"], v["precision"], v["recall"]]
                             for g, v in self.overlap.items()])}


@dataclass(kw_only=True)
class DCMResult(Result):
    schema = "etk.dcm/v1"
    method = "dcm"
    figures = ("mask.png",)
    model: str
    circuit: str
    circuit_spec: str
    group: str
    desideratum: str
    group_size: int
    n_selected: int
    selected_heads: list[list[int]]
    test: AccuracyCI
    chance_floor_unpatched: AccuracyCI
    best_val_accuracy: float | None = None
    mask_raw: list[float] = field(default_factory=list)

    def headline(self):
        return {"test/accuracy": self.test["accuracy"], "test/floor": self.chance_floor_unpatched["accuracy"],
                "n_selected": float(self.n_selected)}

    def tables(self):
        return {"selected_heads": (["layer", "head"], [list(h) for h in self.selected_heads]),
                "mask": (["index", "mask"], [[i, float(v)] for i, v in enumerate(self.mask_raw)])}


@dataclass(kw_only=True)
class ActivationPatchingResult(Result):
    schema = "etk.activation_patching/v1"
    method = "activation_patching"
    model: str
    group: str
    desideratum: str
    heads: list[list[int]]
    random_heads: list[list[int]]
    repeats: int
    n: int
    accuracy_percent: dict[str, dict[str, Any]]  # unpatched_floor | selected_heads | random_heads -> mean, sd, pooled

    def headline(self):
        return {f"ap/{k}": float(v["mean"]) for k, v in self.accuracy_percent.items()}

    def tables(self):
        return {"accuracy_percent": (["rows", "mean", "sd", "pooled accuracy", "ci_low", "ci_high"],
                                     [[k, v["mean"], v["sd"], v["pooled"]["accuracy"], v["pooled"]["ci_low"],
                                       v["pooled"]["ci_high"]] for k, v in self.accuracy_percent.items()])}


@dataclass(kw_only=True)
class CMAPResult(Result):
    schema = "etk.cmap/v1"
    method = "cmap"
    pair: str
    direction: str
    source_model: str
    target_model: str
    head_sources: dict[str, str]
    adapter_toggled: bool
    circuit: str
    results: dict[str, dict[str, Any]]  # source_alone | target_alone | <group> | all -> AccuracyCI (+ share_of_gap)

    def headline(self):
        return {f"cmap/{k}": v["accuracy"] for k, v in self.results.items() if v.get("accuracy") is not None}

    def tables(self):
        return {"cmap": (["heads patched", "accuracy", "ci_low", "ci_high", "share_of_gap"],
                         [[k, v["accuracy"], v["ci_low"], v["ci_high"], (v.get("share_of_gap") or {}).get("share")]
                          for k, v in self.results.items()])}


@dataclass(kw_only=True)
class ModelDiffResult(Result):
    schema = "etk.model_diff/v1"
    method = "model_diff"
    base_model: str
    finetuned_model: str
    n: int
    by_group: list[dict[str, Any]]
    verdict: dict[str, Any]
    top_changed: dict[str, Any]
    token_kl: dict[str, Any]
    logit_lens: dict[str, Any]
    heatmaps: list[str] = field(default_factory=list)
    adapter_toggled: bool = False

    def figure_paths(self):
        return [self.dir / h for h in self.heatmaps if self.dir is not None and (self.dir / h).exists()]

    def tables(self):
        keys = ["group", "n_heads", "role", "weight_delta", "activation_delta", "dla_change"]
        return {"by_group": (keys, [[r.get(k) for k in keys] for r in self.by_group])}


@dataclass(kw_only=True)
class KnockoutResult(Result):
    schema = "etk.knockout/v1"
    method = "knockout"
    figures = ("knockout.png",)
    model: str
    baseline: AccuracyCI
    edges: dict[str, dict[str, list]]  # edge -> {start_layer, accuracy, ci_low, ci_high}

    def headline(self):
        return {"knockout/baseline": self.baseline["accuracy"]} if self.baseline["accuracy"] is not None else {}

    def tables(self):
        return {"knockout": (["edge", "start_layer", "accuracy", "ci_low", "ci_high"],
                             [[e, s, a, lo, hi] for e, c in self.edges.items()
                              for s, a, lo, hi in zip(c["start_layer"], c["accuracy"], c["ci_low"], c["ci_high"])])}


@dataclass(kw_only=True)
class FinetuneResult(Result):
    schema = "etk.finetune/v1"
    method = "finetune"
    base_model: str
    steps: int
    train_seconds: float
    final_train_loss: float | None
    eval: list[dict[str, Any]]  # AccuracyCI + n_boxes per box count

    def tables(self):
        return {"eval": (["n_boxes", "accuracy", "ci_low", "ci_high", "n"],
                         [[r["n_boxes"], r["accuracy"], r["ci_low"], r["ci_high"], r["n"]] for r in self.eval])}


RESULT_TYPES: dict[str, type[Result]] = {c.schema: c for c in (
    EvalResult, PathPatchingResult, MinimalityResult, FaithfulnessResult, CompletenessResult, CurveResult,
    CircuitSearchResult, OverlapResult, DCMResult, ActivationPatchingResult, CMAPResult, ModelDiffResult,
    KnockoutResult, FinetuneResult, SpecificityResult, AttentionPatternsResult, CausalImpactResult,
    PositionalHypothesesResult)}
