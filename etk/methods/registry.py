"""The method registry: one spec per method, with direct references to its runner, its result type and its report
section, so readers, IDEs and tests can follow every one. The CLI dispatch (`method=<name>`), the study's steps
(`etk.study`), the report's sections and the multirun collectors are all driven by it.

Adding a method: its folder `etk/methods/<name>/` (a LightningModule in `module.py`, `run(cfg) -> <Result>` in
`run.py`, optionally `section(ctx)` in `report.py`), its result type in `etk/results.py`, its config
`conf/method/<name>.yaml`, and one entry below (plus `etk/study/plan.py` when the study runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from etk.errors import ConfigError
from etk.methods.activation_patching import report as ap_report
from etk.methods.activation_patching.run import batch_key as ap_batch_key
from etk.methods.activation_patching.run import run_activation_patching, run_activation_patching_batch
from etk.methods.attention_patterns import report as attention_report
from etk.methods.attention_patterns.run import run_attention_patterns
from etk.methods.causal_impact import report as causal_impact_report
from etk.methods.causal_impact.run import run_causal_impact
from etk.methods.circuit_search import report as search_report
from etk.methods.circuit_search.run import run_circuit_search
from etk.methods.cmap import report as cmap_report
from etk.methods.cmap.run import run_cmap, run_cmap_batch
from etk.methods.cmap.run import batch_key as cmap_batch_key
from etk.methods.completeness import report as completeness_report
from etk.methods.completeness.run import run_completeness
from etk.methods.dcm import report as dcm_report
from etk.methods.dcm.run import batch_key as dcm_batch_key
from etk.methods.dcm.run import run_dcm, run_dcm_batch
from etk.methods.eval import report as eval_report
from etk.methods.eval.run import run_eval
from etk.methods.faithfulness import report as faithfulness_report
from etk.methods.faithfulness.run import run_faithfulness
from etk.methods.faithfulness_curve import report as curve_report
from etk.methods.faithfulness_curve.run import run_faithfulness_curve
from etk.methods.finetune.run import run_finetune
from etk.methods.knockout import report as knockout_report
from etk.methods.knockout.run import run_knockout
from etk.methods.minimality.run import run_minimality
from etk.methods.model_diff import report as model_diff_report
from etk.methods.model_diff.run import run_model_diff
from etk.methods.overlap.run import run_overlap
from etk.methods.path_patching import report as pp_report
from etk.methods.positional_hypotheses import report as positional_report
from etk.methods.positional_hypotheses.run import run_positional_hypotheses
from etk.methods.path_patching.run import run_path_patching
from etk.methods.specificity.run import run_specificity
from etk.report.context import ReportContext, Section
from etk.results import (
    ActivationPatchingResult,
    AttentionPatternsResult,
    CausalImpactResult,
    CircuitSearchResult,
    CMAPResult,
    CompletenessResult,
    CurveResult,
    DCMResult,
    EvalResult,
    FaithfulnessResult,
    FinetuneResult,
    KnockoutResult,
    MinimalityResult,
    ModelDiffResult,
    OverlapResult,
    PathPatchingResult,
    PositionalHypothesesResult,
    Result,
    SpecificityResult,
)

Table = tuple[list[str], list[list[str]]]


@dataclass(frozen=True)
class MethodSpec:
    name: str  # `method=<name>`, config `conf/method/<name>.yaml` (dcm: `train_dcm.py`, its own primary config)
    run: Callable[..., Result]  # cfg -> the method's typed result (also written to results.json)
    result: type[Result]
    section: Callable[[ReportContext], Section | None] | None = None  # the study report's section of this step
    collect: Callable[..., str | None] | None = None  # results of a multirun, out dir -> the Markdown table written
    collect_title: str = ""  # what that table is, printed above it
    entry: str = "patching"  # the primary config it runs under: patching | dcm | finetune
    summary: str = ""
    # Jobs of a study step whose configs have the same `batch_key` (not None) share their frozen work: the study runs
    # them together with `run_batch([(cfg, folder), ...])`, which writes each job's result into its folder.
    batch_key: Callable[[Any], str | None] | None = None
    run_batch: Callable[[list[tuple[Any, Path]]], list[Result]] | None = None

    @property
    def schema(self) -> str:
        return self.result.schema


REGISTRY: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("eval", run_eval, EvalResult, eval_report.section, eval_report.collect, "accuracy (95% CI)",
               summary="task accuracy with a 95% interval"),
    MethodSpec("path_patching", run_path_patching, PathPatchingResult, pp_report.section,
               summary="4-stage circuit discovery; writes the paper's candidate sets"),
    MethodSpec("minimality", run_minimality, MinimalityResult,
               summary="the paper's significance pruning of candidate sets"),
    MethodSpec("faithfulness", run_faithfulness, FaithfulnessResult, faithfulness_report.section,
               faithfulness_report.collect, "faithfulness matrix",
               summary="F(circuit)/F(model) under mean ablation, with its all-heads reference and random circuits"),
    MethodSpec("faithfulness_curve", run_faithfulness_curve, CurveResult, curve_report.section,
               summary="faithfulness of top-x% circuits, CPR and CMD"),
    MethodSpec("circuit_search", run_circuit_search, CircuitSearchResult, search_report.section,
               summary="position-aware circuit grown to a target faithfulness"),
    MethodSpec("completeness", run_completeness, CompletenessResult, completeness_report.section, summary="incompleteness |F(C\\K) - F(M\\K)|"),
    MethodSpec("overlap", run_overlap, OverlapResult, summary="shared heads of two circuits per group"),
    MethodSpec("dcm", run_dcm, DCMResult, dcm_report.section, dcm_report.collect, "DCM", entry="dcm",
               summary="desiderata-based component masks", batch_key=dcm_batch_key, run_batch=run_dcm_batch),
    MethodSpec("activation_patching", run_activation_patching, ActivationPatchingResult, ap_report.section,
               summary="DCM head sets patched inside a model", batch_key=ap_batch_key,
               run_batch=run_activation_patching_batch),
    MethodSpec("cmap", run_cmap, CMAPResult, cmap_report.section,
               summary="cross-model activation patching and the share of the gap", batch_key=cmap_batch_key,
               run_batch=run_cmap_batch),
    MethodSpec("model_diff", run_model_diff, ModelDiffResult, model_diff_report.section,
               summary="what fine-tuning changed per head (weights, z, DLA, lens, token KL) beside the CMAP gain"),
    MethodSpec("knockout", run_knockout, KnockoutResult, knockout_report.section,
               summary="attention-edge knockout from each start layer"),
    MethodSpec("attention_patterns", run_attention_patterns, AttentionPatternsResult, attention_report.section,
               summary="attention probabilities of a circuit's heads from their role to the task's roles"),
    MethodSpec("causal_impact", run_causal_impact, CausalImpactResult, causal_impact_report.section,
               summary="the fine-tuned circuit's heads scored in both members, shared vs added heads"),
    MethodSpec("positional_hypotheses", run_positional_hypotheses, PositionalHypothesesResult, positional_report.section,
               summary="which positional information a head set carries: variants and cross-length pairs scored "
                       "against ordinal / token-offset hypotheses"),
    MethodSpec("specificity", run_specificity, SpecificityResult,
               summary="a circuit of one task ablated everywhere, measured on another task, against random heads"),
    MethodSpec("finetune", run_finetune, FinetuneResult, entry="finetune", summary="LoRA or full fine-tuning"),
)}
STUDY_METHODS = ("study", "study_paper", "study_tasks")  # method configs that run the study (etk.study): at CPU or
# paper sizes, or one study per task and the comparison across tasks


def get(name: str) -> MethodSpec:
    """The spec of `method=<name>` (a ConfigError naming the available methods otherwise)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted([*REGISTRY, *STUDY_METHODS]))}")
    return spec
