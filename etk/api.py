"""The Python API: etk's methods on models already in memory, from a notebook or a script — the same runner code
the CLI runs (the config is composed by Hydra from the same files, validated the same way, and the run writes the
same artefacts), returning typed results.

    import etk
    model = etk.load_model("tiny")                        # a config name (conf/model/<name>.yaml) or a local HF dir
    pp = etk.path_patching(model, n_examples=20)         # PathPatchingResult; pp.dir holds circuit.json, heatmaps
    f = etk.faithfulness(model, pp, n_examples=40)       # the circuit: a result, a Circuit, a path or a shipped name
    f.faithfulness, f.ci_low, f.ci_high; f.plot()
    cm = etk.cmap(base, finetuned, pp)                   # CMAPResult
    etk.load_result("outputs/patching/faithfulness/...")  # any run folder the CLI wrote, typed

Keyword arguments set the method's config (`method.<key>`; DCM: `dcm.<key>`); a dict under a top-level key sets that
block (`data={"n_boxes": 3}`, `ablation={"n_prompts": 100}`, `trainer={...}`), `seed=...` the seed, `task="ioi"` the
task (`task={"name": "ioi", "places": [...]}` its settings). Each run writes into `out_dir` (default: a new temporary
folder)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from etk.circuits import Circuit
from etk.models.loading import LoadedModel, preloaded
from etk.models.loading import load_model as _load_weights
from etk.results import (
    CircuitSearchResult,
    CMAPResult,
    DCMResult,
    FaithfulnessResult,
    KnockoutResult,
    ModelDiffResult,
    PathPatchingResult,
    Result,
    load_result,
)
from etk.runtime import compose, hydra_value, step_output, to_overrides

TOP_LEVEL = ("task", "data", "ablation", "trainer", "seed", "scores")  # keyword arguments that are not the method's own


def load_model(name_or_dir: str | Path, **overrides: Any) -> LoadedModel:
    """A frozen model in memory: `name_or_dir` is a model config name (`tiny`, `smollm2_tracker_weak`, ...) or a
    local Hugging Face folder; `overrides` set keys of the model config (`dtype="float32"`, `adapters=[...]`)."""
    path = Path(str(name_or_dir)).expanduser()
    args = (["model=local", f"model.path={path.resolve()}", f"model.name={path.name}"] if path.is_dir()
            else [f"model={name_or_dir}"])
    cfg = compose("patching", args + to_overrides("model", overrides))
    plain = OmegaConf.to_container(cfg.model, resolve=True)
    net, tok = _load_weights(cfg.model)
    return LoadedModel(net, tok, plain)


def _circuit_args(circuit: Any, out: Path) -> list[str]:
    """`circuit.path=...` for a typed result that wrote a circuit.json, a Circuit object, a path, or a shipped name."""
    if circuit is None:
        return []
    if isinstance(circuit, Result):
        return [f"circuit.path={circuit.dir / 'circuit.json'}"]
    if isinstance(circuit, Circuit):
        return [f"circuit.path={circuit.save(out / 'input_circuit.json')}"]
    if Path(str(circuit)).expanduser().exists():
        return [f"circuit.path={circuit}"]
    return [f"circuit={circuit}"]


def _run(method: str, models: dict[str, LoadedModel], overrides: dict[str, Any], out_dir: str | Path | None,
         circuit: Any = None, primary: str = "patching", extra: list[str] | None = None) -> Any:
    """Compose `primary` with the method and the overrides, put the in-memory models into it, validate, run the
    registered method in `out_dir` on those models."""
    from etk.methods.registry import get
    from etk.validate import validate

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"etk-{method}-"))
    out.mkdir(parents=True, exist_ok=True)
    block = "dcm" if primary == "dcm" else "method"
    args = ([f"method={method}"] if primary == "patching" else []) + ["logger=none"] + _circuit_args(circuit, out)
    for k, v in overrides.items():
        if k in TOP_LEVEL:
            args += to_overrides(k, v) if isinstance(v, dict) else [f"{k}={hydra_value(v)}"]
        else:
            args += to_overrides(block, {k: v})
    cfg = compose(primary, args + (extra or []))
    with open_dict(cfg):
        for key, model in models.items():  # model, pair.base, pair.finetuned: exactly the models held
            OmegaConf.update(cfg, key, OmegaConf.create(model.cfg), merge=False)
        if "pair.base" in models:
            cfg.pair.name = f"{models['pair.base'].name}->{models['pair.finetuned'].name}"
    validate(cfg)
    with preloaded(*models.values()), step_output(out):
        return get(method).run(cfg)


def path_patching(model: LoadedModel, out_dir: str | Path | None = None, **overrides: Any) -> PathPatchingResult:
    """Four-stage circuit discovery (VF, PT, PD, SR); `.dir / "circuit.json"` holds the candidate sets."""
    return _run("path_patching", {"model": model}, overrides, out_dir)


def minimality(model: LoadedModel, circuit: Any, out_dir: str | Path | None = None, **overrides: Any) -> Result:
    """The paper's significance pruning of a circuit's candidate sets; `.dir / "circuit.json"` is the pruned circuit."""
    return _run("minimality", {"model": model}, overrides, out_dir, circuit)


def faithfulness(model: LoadedModel, circuit: Any, out_dir: str | Path | None = None,
                 **overrides: Any) -> FaithfulnessResult:
    """F(circuit)/F(model) under mean ablation, with its interval, all-heads reference and random circuits."""
    return _run("faithfulness", {"model": model}, overrides, out_dir, circuit)


def circuit_search(model: LoadedModel, out_dir: str | Path | None = None, **overrides: Any) -> CircuitSearchResult:
    """A position-aware circuit grown to `target` faithfulness."""
    return _run("circuit_search", {"model": model}, overrides, out_dir)


def dcm(model: LoadedModel, circuit: Any, group: str, desideratum: str, out_dir: str | Path | None = None,
        **overrides: Any) -> DCMResult:
    """A DCM mask over one circuit group for one desideratum (`object`, `position`, `label`, ...)."""
    return _run("dcm", {"model": model}, overrides, out_dir, circuit, primary="dcm",
                extra=[f"group={group}", f"desideratum={desideratum}"])


def cmap(base: LoadedModel, finetuned: LoadedModel, circuit: Any, out_dir: str | Path | None = None,
         **overrides: Any) -> CMAPResult:
    """Cross-model activation patching of the circuit's heads (fine-tuned -> base by default) and the share of
    the accuracy gap each group recovers."""
    return _run("cmap", {"pair.base": base, "pair.finetuned": finetuned, "model": base}, overrides, out_dir, circuit)


def model_diff(base: LoadedModel, finetuned: LoadedModel, circuit: Any = None, out_dir: str | Path | None = None,
               **overrides: Any) -> ModelDiffResult:
    """What fine-tuning changed per head (weights, z, DLA, logit lens, token KL)."""
    return _run("model_diff", {"pair.base": base, "pair.finetuned": finetuned, "model": base}, overrides, out_dir,
                circuit)


def knockout(model: LoadedModel, out_dir: str | Path | None = None, **overrides: Any) -> KnockoutResult:
    """Attention-edge knockout from each start layer."""
    return _run("knockout", {"model": model}, overrides, out_dir)


__all__ = ["load_model", "load_result", "path_patching", "minimality", "faithfulness", "circuit_search", "dcm", "cmap",
           "model_diff", "knockout", "LoadedModel"]
