"""A 7B memory/time plan per method, from a finished CPU study: each step's measured CPU seconds, scaled by the work
the paper's sizes add (`method=study_paper` vs the CPU study, and Llama-7B's 32x32 heads vs the model's) and by
FLOPs per token (7B vs the measured model), divided by an assumed GPU-over-CPU throughput. An ESTIMATE: it prints
its assumptions.

    python benchmarks/scale_plan.py <study run dir> [--gpu-speedup 40]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
PARAMS_7B, PARAMS_SMOL = 6.5e9, 1.07e8  # non-embedding parameters: 2 FLOPs per parameter per token
HEADS_7B, HEADS_SMOL = 32 * 32, 30 * 9


def work_ratio(step: str, cpu: dict, paper: dict) -> float:
    """How much more the paper's sizes compute than the CPU study's, for one step (prompts x configurations)."""
    c, p = cpu.get(step, {}), paper.get(step, {})
    n = lambda d, k, default: float(d.get(k, default))  # noqa: E731
    if step == "eval":
        return n(p, "n_examples", 500) / n(c, "n_examples", 300)
    if step == "path_patching":
        return n(p, "n_examples", 300) / n(c, "n_examples", 20) * HEADS_7B / HEADS_SMOL
    if step == "minimality":  # batched pair drops (sum n(n+1)/2 + 2n over Llama's 50/10/25/5) vs greedy 3n (27/8/15/8)
        paper_evals = sum(k * (k + 1) / 2 + 2 * k for k in (50, 10, 25, 5))
        return n(p, "n_examples", 100) / n(c, "n_examples", 40) * paper_evals / sum(3 * k + 1 for k in (27, 8, 15, 8))
    if step in ("faithfulness", "faithfulness_curve"):
        return n(p, "n_examples", 500) / n(c, "n_examples", 60) * (n(p, "n_random", 10) + 3) / (n(c, "n_random", 3) + 3)
    if step == "circuit_search":
        return (n(p, "n_search", 210) + n(p, "n_heldout", 490)) / (n(c, "n_search", 35) + n(c, "n_heldout", 70)) * HEADS_7B / HEADS_SMOL
    if step == "dcm":
        return (n(p, "n_train", 1000) + n(p, "n_eval", 500) * 16 + n(p, "n_test", 500)) / (
            n(c, "n_train", 48) + n(c, "n_eval", 24) * 3 + n(c, "n_test", 40)) * 2  # both members
    if step == "activation_patching":
        return n(p, "n_examples", 500) * n(p, "repeats", 10) / (n(c, "n_examples", 32) * n(c, "repeats", 2)) * 2 * 1.5
    if step == "cmap":
        return n(p, "n_examples", 500) / n(c, "n_examples", 100)
    if step == "model_diff":
        return n(p, "n_examples", 500) / n(c, "n_examples", 40)
    if step == "knockout":
        return n(p, "n_examples", 500) / n(c, "n_examples", 24) * 32 / 8
    return 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--gpu-speedup", type=float, default=40.0,
                    help="fp32 throughput of one 80 GB GPU over the 2 measured CPU cores (A100 fp32 ~40x)")
    args = ap.parse_args()
    cpu = OmegaConf.to_container(OmegaConf.load(CONF / "study.yaml"))
    paper = {**cpu, **OmegaConf.to_container(OmegaConf.load(CONF / "study_paper.yaml"))}
    flops = PARAMS_7B / PARAMS_SMOL
    print(f"assumptions: FLOPs/token x{flops:.0f} (7B vs SmolLM2-135M), GPU/CPU throughput x{args.gpu_speedup:.0f} (fp32); "
          "memory: 7B fp32 weights 27 GB (CMAP of a LoRA pair holds one copy + the adapter; of two full models 54 GB)")
    print(f"{'step':<22}{'CPU s':>8}{'work x':>9}{'7B GPU min (est.)':>19}  memory")
    total = 0.0
    for step_dir in sorted(p for p in args.study.iterdir() if p.is_dir()):
        secs = [json.loads(f.read_text())["seconds"] for f in step_dir.glob("*/job_seconds.json")]
        if not secs:
            continue
        step, s = step_dir.name, sum(secs)
        w = work_ratio(step, cpu, paper)
        est = s * w * flops / args.gpu_speedup / 60
        total += est
        mem = ("27 GB + backward through the model (DCM: ~2x at batch 32)" if step == "dcm" else
               "27-54 GB (pair)" if step in ("cmap", "model_diff") else "27 GB + activations")
        print(f"{step:<22}{s:>8.0f}{w:>9.1f}{est:>19.0f}  {mem}")
    print(f"{'total':<22}{'':>8}{'':>9}{total:>19.0f}  (one GPU; DDP over k GPUs divides the predict loops by ~k)")


if __name__ == "__main__":
    main()
