"""The precision gate: may a study run its fp32 GEMMs in TF32 (`model.matmul_precision=high`; bf16 inputs with
`medium`)? Runs the study's decision steps (path patching, with its fp32 re-score of the heads near each top-k cut;
minimality; DCM; activation patching) on the embedded pair once per setting — exact fp32, each reduced precision asked
for, and with `--fp64` the same in float64 as the reference for rounding itself — and compares every decision: the
candidate sets, the minimality circuits, the DCM selections and every accuracy must be identical (other floats are
reported as the largest difference). One run at a time (subprocesses), each in its own folder.

    python benchmarks/precision_gate.py                        # fp32 vs high on the run's device
    python benchmarks/precision_gate.py --precisions high medium --fp64 --device cuda

Last line: `precision_gate: high=<identical|N differences> ... [fp64=<...>] gate=<pass|fail>`. TF32 is safe for a
study when the gate passes on it (on the GPU it will run on); on a CPU `high` changes nothing (no TF32 units), so the
CPU run checks the harness and, with --fp64, how far fp32 rounding itself moves the study's decisions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _setup import ROOT
from study_speed import compare

STEPS = "[path_patching,minimality,dcm,activation_patching]"
SIZES = ["method.path_patching.n_examples=20", "method.minimality.n_examples=40", "method.plan.dcm_desiderata=[position]"]


def run(name: str, out: Path, device: str, extra: list[str]) -> Path:
    folder = out / name
    if (folder / "report.md").exists():  # resumable: a setting already run is read again
        return folder
    cmd = [sys.executable, "run_patching.py", "method=study", "pair=smol_enhance", "model=base", f"method.steps={STEPS}",
           "logger=none", f"hydra.run.dir={folder}", f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
           *SIZES, *extra]
    print(f"precision_gate: {name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return folder


def differences(a: Path, b: Path) -> tuple[list[str], float]:
    """Decision differences and the largest other float difference between two study folders."""
    bad, worst = [], 0.0
    for ra in sorted(a.rglob("results.json")):
        rb = b / ra.relative_to(a)
        if not rb.exists():
            bad.append(f"{ra.relative_to(a)}: only in {a.name}")
            continue
        read = lambda f, root: json.loads(f.read_text().replace(str(root), "<root>"))  # noqa: E731  (paths name the run)
        d, e = compare(read(ra, a), read(rb, b), str(ra.parent.relative_to(a)))
        worst, bad = max(worst, d), bad + e
    return bad, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", nargs="+", default=["high"], help="matmul precisions to gate (high, medium)")
    ap.add_argument("--fp64", action="store_true", help="also compare with a float64 run (the rounding reference)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "precision_gate")
    args = ap.parse_args()
    member = lambda k, v: [f"pair.base.{k}={v}", f"pair.finetuned.{k}={v}"]  # noqa: E731
    ref = run("fp32", args.out, args.device, [])
    verdicts, ok = [], True
    settings = [(p, member("matmul_precision", p)) for p in args.precisions]
    settings += [("fp64", member("dtype", "float64"))] if args.fp64 else []
    for name, extra in settings:
        bad, worst = differences(ref, run(name, args.out, args.device, extra))
        print(f"precision_gate: fp32 vs {name}: " + ("identical decisions" if not bad else f"{len(bad)} differences: "
              + "; ".join(bad[:8])) + f"; largest other float difference {worst:.2e}", flush=True)
        verdicts.append(f"{name}={'identical' if not bad else f'{len(bad)}_differences'}")
        ok = ok and (not bad or name == "fp64")  # fp64 is the reference for rounding, not a setting to pass
    print("precision_gate: " + " ".join(verdicts) + f" device={args.device} gate={'pass' if ok else 'fail'}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
