"""Each study step that has an exact saving, run both ways on the embedded pair in one process: its reference
procedure (`<step>.reference=true`: the pre-0.9 code path) and the default. Prints, per step, both wall times, the
ratio and the comparison of their results (every selection, circuit and accuracy must be identical; other floats
within --tol), then one line:

    dcm=<x> activation_patching=<x> knockout=<x> minimality=<x> circuit_search=<x> path_patching=<x> max_abs_diff=<d>

It reads the circuits and DCM head sets of a finished study of the pair (`make run`; default: the newest under
outputs/patching/study/). One torch process: run nothing else beside it.

    python benchmarks/study_speed.py --quick          # one member / one desideratum per step (~6 min on 2 cores)
    python benchmarks/study_speed.py --study outputs/patching/study/base/<time>
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _setup import ROOT

# result keys whose values are decisions (selections, circuits, accuracies): identical both ways (a key matches when
# it equals one of these or ends with "_<one of these>")
EXACT = ("accuracy", "selected_heads", "heads", "kept", "pruned", "circuit", "n_selected", "per_repeat", "mean", "test",
         "chance_floor_unpatched", "best_val_accuracy", "significance", "before", "after", "K", "faithfulness", "units",
         "pooled", "selected", "candidates")
# what each mode did (costs, counts, times, the growth sizes a lazy grid left out: "tried"), not what it found
IGNORED = {"config", "resources", "train_seconds", "wall_s", "checkpoint_bytes", "jointly_fit_with", "validations_run",
           "evaluated", "evaluations", "forwards", "vital_forwards", "active_forwards", "token_layer_blocks",
           "min_token_layer_blocks", "speed_of_light_pct", "top_layer_attention_only_tokens", "tried", "seconds", "search_seconds", "elapsed_s", "rescored_in_fp32"}


def is_exact(key: str) -> bool:
    return key in EXACT or any(key.endswith("_" + e) for e in EXACT)


def newest_study() -> Path:
    runs = sorted((ROOT / "outputs" / "patching" / "study").glob("*/*/report.md"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no finished study under outputs/patching/study/: run `make run` first (or pass --study DIR)")
    return runs[-1].parent


WORST = {"diff": 0.0, "where": ""}  # where the largest float difference is (printed with the step's line)


def compare(a: Any, b: Any, where: str = "", exact: bool = False) -> tuple[float, list[str]]:
    """(max |float difference| outside decision keys, differences that matter) between two result records."""
    if isinstance(a, dict) and isinstance(b, dict):
        worst, bad = 0.0, []
        for k in sorted(set(a) | set(b)):
            if k in IGNORED:
                continue
            if k not in a or k not in b:
                bad.append(f"{where}.{k}: only in one")
                continue
            d, e = compare(a[k], b[k], f"{where}.{k}", exact or is_exact(str(k)))
            worst, bad = max(worst, d), bad + e
        return worst, bad
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return 0.0, [f"{where}: length {len(a)} vs {len(b)}"]
        worst, bad = 0.0, []
        for i, (x, y) in enumerate(zip(a, b)):
            d, e = compare(x, y, f"{where}[{i}]", exact)
            worst, bad = max(worst, d), bad + e
        return worst, bad
    if isinstance(a, float) and isinstance(b, float) and not exact:
        if math.isnan(a) and math.isnan(b):
            return 0.0, []
        if abs(a - b) > WORST["diff"]:
            WORST.update(diff=abs(a - b), where=where)
        return abs(a - b), []
    return 0.0, ([] if a == b else [f"{where}: {a!r} vs {b!r}"])


class Bench:
    def __init__(self, study: Path, quick: bool, tmp: Path):
        self.study, self.quick, self.tmp = study, quick, tmp
        self.lines: list[str] = []

    def compose(self, entry: str, overrides: list[str]):
        from etk.runtime import compose
        from etk.validate import validate

        head = [f"method={overrides.pop(0)}"] if entry == "patching" else []
        cfg = compose(entry, head + ["pair=smol_enhance", "logger=none", "trainer.enable_progress_bar=false"] + overrides)
        validate(cfg)
        return cfg

    def sizes(self, step: str, prefix: str = "method") -> list[str]:
        from omegaconf import OmegaConf

        from etk.runtime import compose, to_overrides

        block = compose("patching", ["method=study"]).method.get(step)
        return to_overrides(prefix, OmegaConf.to_container(block)) if block else []

    def both(self, step: str, run: Callable[[bool, Path], list[Path]]) -> tuple[float, float]:
        """Time `run(reference, out)` both ways (reference first), compare what they wrote; (ratio, max diff)."""
        from etk.artifacts import read_json

        times, outs = {}, {}
        for reference in (True, False):
            out = self.tmp / step / ("reference" if reference else "default")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            outs[reference] = run(reference, out)
            times[reference] = time.perf_counter() - t0
        worst, bad = 0.0, []
        WORST.update(diff=0.0, where="")
        for ref, new in zip(outs[True], outs[False]):
            d, e = compare(read_json(ref / "results.json"), read_json(new / "results.json"), ref.name)
            worst, bad = max(worst, d), bad + e
        ratio = times[True] / times[False]
        verdict = "identical decisions" if not bad else f"{len(bad)} DIFFERENCES: " + "; ".join(bad[:5])
        self.lines.append(f"{step}: reference {times[True]:.1f} s, default {times[False]:.1f} s, x{ratio:.2f}; "
                          f"{len(outs[True])} result(s), {verdict}, max |float diff| {worst:.2e}"
                          + (f" (at {WORST['where']})" if worst else ""))
        print(self.lines[-1], flush=True)
        if bad:
            self.failed = True
        return ratio, worst

    def in_dirs(self, spec_name: str, cfgs: list, out: Path, batch: bool) -> list[Path]:
        from etk.methods.registry import REGISTRY
        from etk.runtime import step_output

        spec = REGISTRY[spec_name]
        folders = [out / f"job{i}" for i in range(len(cfgs))]
        groups: dict[Any, list[int]] = {}
        for i, c in enumerate(cfgs):
            key = spec.batch_key(c) if batch and spec.batch_key else None
            groups.setdefault(i if key is None else key, []).append(i)
        for idx in groups.values():
            if len(idx) > 1:
                spec.run_batch([(cfgs[i], folders[i]) for i in idx])
            else:
                with step_output(folders[idx[0]]):
                    spec.run(cfgs[idx[0]])
        return folders

    # -- the steps ----------------------------------------------------------------------------------------------
    def dcm_jobs(self) -> list[tuple[str, str, str]]:
        """(group, desideratum config name, circuit file) of the study's DCM jobs, whole groups and the shared/added
        split (quick: the desideratum with the most jobs, i.e. one of the study's joint fits)."""
        import yaml

        from etk.results import DCMResult

        desid = {yaml.safe_load(f.read_text())["name"]: f.stem for f in (ROOT / "conf" / "desideratum").glob("*.yaml")}
        jobs = []
        for f in sorted((self.study / "dcm").glob("*/results.json")):
            r = DCMResult.load(f.parent)
            jobs.append((r.group, desid.get(r.desideratum, r.desideratum), r.config["circuit"]["path"]))
        if self.quick:
            counts = {d: sum(1 for _, x, _ in jobs if x == d) for _, d, _ in jobs}
            top = max(counts, key=counts.get)
            jobs = [j for j in jobs if j[1] == top]
        return jobs

    def dcm(self) -> tuple[float, float]:
        jobs = self.dcm_jobs()

        def run(reference: bool, out: Path) -> list[Path]:
            cfgs = [self.compose("dcm", ["model=finetuned", f"circuit.path={c}", f"group={g}", f"desideratum={d}",
                                         *self.sizes("dcm", "dcm"), f"dcm.reference={str(reference).lower()}"])
                    for g, d, c in jobs]
            return self.in_dirs("dcm", cfgs, out, not reference)
        return self.both("dcm", run)

    def activation_patching(self) -> tuple[float, float]:
        from etk.results import DCMResult

        heads = []
        for f in sorted((self.study / "dcm").glob("*/results.json")):
            r = DCMResult.load(f.parent)
            whole = not r.config.get("circuit", {}).get("path", "").endswith(("shared.json", "added.json"))
            if whole and r.selected_heads and r.desideratum in ("positional",) + (() if self.quick else ("object_value",)):
                heads.append(f.parent)

        def run(reference: bool, out: Path) -> list[Path]:
            cfgs = [self.compose("patching", ["activation_patching", "model=base", f"method.heads={f / 'results.json'}",
                                              *self.sizes("activation_patching"),
                                              f"method.reference={str(reference).lower()}"]) for f in heads]
            return self.in_dirs("activation_patching", cfgs, out, not reference)
        return self.both("activation_patching", run)

    def single(self, step: str, member_extra: Callable[[str], list[str]]) -> tuple[float, float]:
        members = ["finetuned"] if self.quick else ["base", "finetuned"]

        def run(reference: bool, out: Path) -> list[Path]:
            cfgs = [self.compose("patching", [step, f"model={m}", *member_extra(m), *self.sizes(step),
                                              f"ablation.n_prompts={60}", f"method.reference={str(reference).lower()}"])
                    for m in members]
            return self.in_dirs(step, cfgs, out, False)
        return self.both(step, run)

    def from_study(self, step: str, batch: bool = False) -> tuple[float, float]:
        """The study's own jobs of `step` (their circuits, directions, head selections, read from its results),
        each alone with `method.reference=true`, then the default (`batch`: jobs of one batch key as one pass)."""
        from etk.artifacts import read_json

        folders = sorted(f.parent for f in (self.study / step).glob("*/results.json"))
        if self.quick:
            folders = folders[:2] if step == "cmap" else folders[-1:]
        keys = ("direction", "dcm_runs", "k_circuits")

        def overrides(f: Path) -> list[str]:
            c = read_json(f / "results.json")["config"]
            given = {k: c["method"][k] for k in keys if c["method"].get(k) is not None}
            lists = [f"method.{k}=[{','.join(v)}]" if isinstance(v, list) else f"method.{k}={v}" for k, v in given.items()]
            return [step, f"circuit.path={c['circuit']['path']}", *lists, *self.sizes(step), f"ablation.n_prompts={60}"]

        def run(reference: bool, out: Path) -> list[Path]:
            member = lambda f: f.name if f.name in ("base", "finetuned") else "finetuned"  # noqa: E731  (CMAP: a pair)
            cfgs = [self.compose("patching", [*overrides(f), f"model={member(f)}", f"method.reference={str(reference).lower()}"])
                    for f in folders]
            return self.in_dirs(step, cfgs, out, batch and not reference)
        return self.both(step, run)

    def run(self, steps: list[str]) -> dict[str, tuple[float, float]]:
        self.failed = False
        out: dict[str, tuple[float, float]] = {}
        for step in steps:
            if step == "dcm":
                out[step] = self.dcm()
            elif step == "activation_patching":
                out[step] = self.activation_patching()
            elif step == "knockout":
                out[step] = self.single("knockout", lambda m: [])
            elif step == "minimality":
                out[step] = self.single("minimality", lambda m: [
                    f"circuit.path={self.study / 'path_patching' / m / 'circuit.json'}"])
            elif step == "completeness":
                out[step] = self.from_study(step)
            elif step == "cmap":
                out[step] = self.from_study(step, batch=True)
            elif step in ("circuit_search", "path_patching"):
                from etk.runtime import compose

                if "reference" in compose("patching", [f"method={step}"]).method:
                    out[step] = self.single(step, lambda m: [])
                else:
                    print(f"{step}: no reference mode (no exact saving implemented yet)", flush=True)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one member / one desideratum per step")
    ap.add_argument("--study", type=Path, default=None, help="a finished study run of smol_enhance (default: newest)")
    ap.add_argument("--steps", default="dcm,activation_patching,knockout,minimality,circuit_search,path_patching",
                    help="comma-separated; also completeness and cmap (the study's own jobs, both ways)")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest |difference| allowed in raw (non-decision) floats")
    args = ap.parse_args()
    import torch

    from etk.models.loading import reuse_models
    from etk.runtime import inside_study, quiet_dependencies

    torch.set_num_threads(torch.get_num_threads())
    quiet_dependencies()
    study = args.study or newest_study()
    print(f"study_speed: inputs from {study}", flush=True)
    steps = [s for s in args.steps.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="etk_speed_") as tmp, reuse_models(2), inside_study("smol_enhance"):
        bench = Bench(study, args.quick, Path(tmp))
        from etk.models.loading import load
        from etk.runtime import compose

        for m in ("base", "finetuned"):  # load both members first: neither mode pays for loading
            load(compose("patching", [f"model={m}", "pair=smol_enhance"]).model)
        res = bench.run(steps)
    worst = max((d for _, d in res.values()), default=0.0)
    print("\n".join(bench.lines))
    extra = [s for s in ("completeness", "cmap") if s in res]  # beyond the six: printed when asked for
    print(" ".join(f"{s}={res[s][0]:.2f}" if s in res else f"{s}=n/a" for s in
                   ("dcm", "activation_patching", "knockout", "minimality", "circuit_search", "path_patching", *extra))
          + f" max_abs_diff={worst:.2e}" + ("" if worst <= args.tol and not bench.failed else " FAILED"))
    raise SystemExit(1 if bench.failed or worst > args.tol else 0)


if __name__ == "__main__":
    main()
