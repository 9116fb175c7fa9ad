"""The method registry: one spec per method, registered in one place. The CLI dispatch (`method=<name>`), the
study's steps and the report's sections are all driven by it.

Adding a method: write its folder `etk/methods/<name>/` (a LightningModule in `module.py`, `run(cfg) -> payload`
in `run.py`, optionally `study_jobs(study)` and `section(ctx)`), its config `etk/conf/method/<name>.yaml`, and one
line below."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable

from etk.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str  # `method=<name>`, config `etk/conf/method/<name>.yaml` (dcm: `train_dcm.py`, its own primary config)
    run: str  # "module:function", cfg -> payload (writes results.json with `schema`)
    schema: str
    needs: tuple[str, ...] = ("model",)  # model | pair, and circuit | scores | heads when it reads those
    artefacts: tuple[str, ...] = ("results.json",)
    entry: str = "patching"  # the primary config it runs under: patching | dcm | finetune
    study: str | None = None  # "module:function", Study -> the jobs of this study step
    report: str | None = None  # "module:function", ReportContext -> the report section of this step
    summary: str = ""

    def runner(self) -> Callable[[Any], dict]:
        return _load(self.run)

    def study_jobs(self) -> Callable | None:
        return _load(self.study) if self.study else None

    def section(self) -> Callable | None:
        return _load(self.report) if self.report else None


def _load(ref: str) -> Callable:
    module, name = ref.split(":")
    return getattr(import_module(module), name)


_M = "etk.methods"
REGISTRY: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("eval", f"{_M}.eval.run:run_eval", "etk.eval/v1", study=f"{_M}.eval.run:study_jobs",
               report=f"{_M}.eval.report:section", summary="task accuracy with a 95% interval"),
    MethodSpec("path_patching", f"{_M}.path_patching.run:run_path_patching", "etk.path_patching/v1",
               artefacts=("results.json", "circuit.json", "scores/<group>.json", "heatmaps/<group>.png"),
               study=f"{_M}.path_patching.run:study_jobs", report=f"{_M}.path_patching.report:section",
               summary="4-stage circuit discovery; writes the paper's candidate sets"),
    MethodSpec("minimality", f"{_M}.circuit_eval.run:run_minimality", "etk.minimality/v1", ("model", "circuit"),
               ("results.json", "circuit.json"), study=f"{_M}.circuit_eval.run:minimality_jobs",
               summary="the paper's significance pruning of candidate sets"),
    MethodSpec("faithfulness", f"{_M}.circuit_eval.run:run_faithfulness", "etk.faithfulness/v1", ("model", "circuit"),
               study=f"{_M}.circuit_eval.run:faithfulness_jobs", report=f"{_M}.circuit_eval.report:faithfulness_section",
               summary="F(circuit)/F(model) under mean ablation, with its ceiling and random circuits"),
    MethodSpec("faithfulness_curve", f"{_M}.circuit_eval.run:run_faithfulness_curve", "etk.faithfulness_curve/v1",
               ("model", "scores"), ("results.json", "curve.json", "curve.png"),
               study=f"{_M}.circuit_eval.run:curve_jobs", report=f"{_M}.circuit_eval.report:quality_section",
               summary="faithfulness of top-x% circuits, CPR and CMD"),
    MethodSpec("circuit_search", f"{_M}.circuit_eval.run:run_circuit_search", "etk.circuit_search/v1",
               artefacts=("results.json", "circuit.json", "circuit.png"), study=f"{_M}.circuit_eval.run:search_jobs",
               report=f"{_M}.circuit_eval.report:search_section",
               summary="position-aware circuit grown to a target faithfulness"),
    MethodSpec("completeness", f"{_M}.circuit_eval.run:run_completeness", "etk.completeness/v1", ("model", "circuit"),
               summary="incompleteness |F(C\\K) - F(M\\K)|"),
    MethodSpec("overlap", f"{_M}.circuit_eval.run:run_overlap", "etk.overlap/v1", ("circuit",),
               summary="shared heads of two circuits per group"),
    MethodSpec("dcm", f"{_M}.dcm.run:run_dcm", "etk.dcm/v1", ("model", "circuit"),
               ("results.json", "selected_heads.json", "mask.pt", "mask.png"), entry="dcm",
               study=f"{_M}.dcm.run:study_jobs", report=f"{_M}.dcm.report:section",
               summary="desiderata-based component masks"),
    MethodSpec("activation_patching", f"{_M}.activation_patching.run:run_activation_patching",
               "etk.activation_patching/v1", ("model", "heads"), study=f"{_M}.activation_patching.run:study_jobs",
               report=f"{_M}.activation_patching.report:section", summary="DCM head sets patched inside a model"),
    MethodSpec("cmap", f"{_M}.cmap.run:run_cmap", "etk.cmap/v1", ("pair", "circuit"), ("results.json", "cmap_table.md"),
               study=f"{_M}.cmap.run:study_jobs", report=f"{_M}.cmap.report:section",
               summary="cross-model activation patching and the share of the gap"),
    MethodSpec("model_diff", f"{_M}.model_diff.run:run_model_diff", "etk.model_diff/v1", ("pair",),
               ("results.json", "heatmaps/<delta>.png"), study=f"{_M}.model_diff.run:study_jobs",
               report=f"{_M}.model_diff.report:section",
               summary="what fine-tuning changed per head (weights, z, DLA, lens, token KL) beside the CMAP gain"),
    MethodSpec("knockout", f"{_M}.knockout.run:run_knockout", "etk.knockout/v1",
               artefacts=("results.json", "knockout.png"), study=f"{_M}.knockout.run:study_jobs",
               report=f"{_M}.knockout.report:section", summary="attention-edge knockout from each start layer"),
    MethodSpec("finetune", f"{_M}.finetune.run:run_finetune", "etk.finetune/v1", entry="finetune",
               artefacts=("results.json", "checkpoints/", "<export>/card.json"), summary="LoRA or full fine-tuning"),
    MethodSpec("study", f"{_M}.study.run:run_study", "etk.study/v1", ("pair",), ("report.md", "<step>/<job>/"),
               summary="the paper's whole argument for a pair, from the steps above"),
)}
ALIASES = {"study_paper": "study"}  # method configs that run another method's code (the study at paper sizes)


def get(name: str) -> MethodSpec:
    """The spec of `method=<name>` (a ConfigError naming the available methods otherwise)."""
    spec = REGISTRY.get(ALIASES.get(name, name))
    if spec is None:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return spec


def run(cfg) -> dict:
    """Dispatch a composed config to its method's runner."""
    return get(cfg.method.name).runner()(cfg)
