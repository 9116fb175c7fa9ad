"""Benchmark: the exact vital-only path for three-position mean ablations vs full-sequence ablated forwards.

    python benchmarks/mean_ablation.py [--model smollm2_tracker] [--prompts 60] [--configs 48]

Configurations are the all-heads reference (every head at the three vital positions) and random circuits of its vital
positions (each head kept with p = 1/2), i.e. what faithfulness, curves, minimality and completeness evaluate.
Both paths run every configuration on the same prompts; the vital path includes its one background forward.
Last line: speedup_vital_vs_full=<x> max_abs_logit_diff=<d> argmax_agreement=<a>"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _setup import load  # noqa: E402  (repo on sys.path, hub off)
from omegaconf import open_dict  # noqa: E402

from etk.data.datasets import prompt_loader
from etk.interventions.hooks import Capture, hooked  # noqa: E402
from etk.methods.mean_ablation.ablation import ablation_patches, all_heads_ablation, keep_rows  # noqa: E402
from etk.methods.mean_ablation.vital import background, vital_logits  # noqa: E402
from etk.models.arch import LlamaFamily  # noqa: E402
from etk.models.forward import last_logits  # noqa: E402
from etk.tasks import task_named  # noqa: E402
from etk.tasks.entity_tracking.boxes import generate_contexts  # noqa: E402
from etk.tasks.entity_tracking.data import task_examples, task_vocab  # noqa: E402
from etk.tasks.entity_tracking.pairs import mean_ablation_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_tracker")
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--configs", type=int, default=48)
    ap.add_argument("--full-per-forward", type=int, default=12, help="configurations per full-sequence forward")
    args = ap.parse_args()
    cfg, model, tok = load(args.model)
    arch = LlamaFamily(model)
    dims = arch.dims
    objects, labels = task_vocab(tok, cfg.data.n_boxes)
    abl = mean_ablation_examples(generate_contexts(args.prompts, cfg.data.n_boxes, objects, labels, 0), random.Random(0))
    ab = next(iter(prompt_loader(task_named("entity_tracking"), tok, abl, args.prompts)))
    with hooked(model, captures=[Capture("z", j) for j in range(dims.n_layers)]) as c:
        arch.base.model(**ab.model_inputs(), use_cache=False)
    means = torch.stack([c[("z", j)].mean(0) for j in range(dims.n_layers)])
    data = cfg.data.copy()
    with open_dict(data):
        data.n_examples, data.seed = args.prompts, 1
    batch = next(iter(prompt_loader(task_named("entity_tracking"), tok, task_examples(data, tok), args.prompts)))
    rng = random.Random(0)
    reference = all_heads_ablation(dims)
    abls = [reference] + [reference.without([(r, lay, h) for r in task_named("entity_tracking").vital_roles for lay in range(dims.n_layers)
                                         for h in range(dims.n_heads) if rng.random() < 0.5])
                        for _ in range(args.configs - 1)]
    t0 = time.perf_counter()
    bg = background(model, batch, means)
    step = max(1, 2048 // len(batch))
    fast = torch.cat([vital_logits(model, batch, means, abls[i:i + step], bg) for i in range(0, len(abls), step)])
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = []
    for i in range(0, len(abls), args.full_per_forward):
        chunk = abls[i:i + args.full_per_forward]
        with hooked(model, patches=ablation_patches(means, keep_rows(chunk, batch))):
            full.append(last_logits(model, batch.repeat(len(chunk))))
    full = torch.cat(full)
    t_full = time.perf_counter() - t0
    T = batch.input_ids.shape[1]
    print(f"model={args.model} prompts={len(batch)} tokens/prompt={T} configurations={len(abls)}")
    print(f"full-sequence forwards: {t_full:.1f} s ({len(abls) * len(batch) * T} token rows x {dims.n_layers} layers)")
    print(f"vital-only path:        {t_fast:.1f} s ({len(abls) * len(batch) * 3 + len(batch) * T} token rows, background "
          "included)")
    agree = float((fast.argmax(-1) == full.argmax(-1)).float().mean())
    print(f"speedup_vital_vs_full={t_full / t_fast:.1f} max_abs_logit_diff={float((fast - full).abs().max()):.2e} "
          f"argmax_agreement={agree:.4f}")


if __name__ == "__main__":
    main()
