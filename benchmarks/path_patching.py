"""Benchmark: naive vs fast vs attribution path patching on the same model and data, all 4 stages.

    python benchmarks/path_patching.py [--model smollm2_135m_instruct] [--pairs 100] [--quick]

The naive algorithm (the definition: 1 forward per sender for VF, 2 for the other stages, over every sender of
the model) runs on a subset of senders (all heads of a few layers spread over the reachable depth); its cost for
all senders is that per-sender cost times the number of heads. Fast and attribution run on every sender. The
equality check compares naive and fast on the subset. Last line:
speedup_fast_vs_naive=<x> block_ratio=<y> speedup_attribution_vs_naive=<z> max_abs_diff=<d>"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from etk.interventions.components import all_heads  # noqa: E402
from etk.methods.path_patching.attribution import attribution_scores  # noqa: E402
from etk.methods.path_patching.discover import discover  # noqa: E402
from etk.methods.path_patching.fast import fast_scores  # noqa: E402
from etk.methods.path_patching.naive import naive_scores  # noqa: E402
from etk.methods.path_patching.stages import LLAMA_SCHEDULE, minimum_blocks, pp_loader, task_stages  # noqa: E402
from etk.models.arch import LlamaFamily  # noqa: E402
from etk.models.loading import load_model  # noqa: E402
from etk.tasks import task_named
from etk.tasks.entity_tracking.data import task_examples  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
RECEIVERS_TOP_K = LLAMA_SCHEDULE["receivers_top_k"]


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def run_all(fn, model, batches, *args, **kw):
    total, cost = None, {}
    for b in batches:
        s, c = fn(model, b, *args, **kw)
        total = s if total is None else total + s
        for k, v in c.items():
            cost[k] = cost.get(k, 0) + v
    return total, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m_instruct")
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--naive-layers", type=int, default=3, help="layers whose heads the naive algorithm scores")
    ap.add_argument("--quick", action="store_true", help="12 pairs, naive on one layer per stage (< 3 min on 2 cores)")
    ap.add_argument("--seed", type=int, default=20)
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.batch_size, args.naive_layers = 12, 12, 1
    torch.set_grad_enabled(False)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("patching", overrides=[f"model={args.model}"])
    model, tok = load_model(cfg.model)
    dims = LlamaFamily(model).dims
    data = cfg.data.copy()
    with open_dict(data):
        data.n_examples = args.pairs
    batches = list(pp_loader(task_named("entity_tracking"), tok, task_examples(data, tok), args.seed, args.batch_size))
    n_all = dims.n_layers * dims.n_heads
    print(f"model={args.model} layers={dims.n_layers} heads={dims.n_heads} kv_heads={dims.n_kv_heads} "
          f"pairs={args.pairs} boxes={data.n_boxes} tokens/prompt={batches[0].clean.input_ids.shape[1]}")
    print(f"{'stage':<16}{'naive s (all)':>14}{'fast s':>9}{'attr s':>9}{'naive blocks':>15}{'fast blocks':>13}"
          f"{'naive fwd':>11}{'max|diff|':>11}{'spearman':>10}{'SoL %':>7}")
    tot = {"naive": 0.0, "fast": 0.0, "attr": 0.0, "nb": 0, "fb": 0, "low": 0}
    stage_s: dict[str, float] = {}
    max_diff = 0.0

    def score(st, rec, reach):
        """One stage: fast and attribution on every reachable sender, naive on the heads of a few layers."""
        nonlocal max_diff
        if not reach:
            print(f"{st.group:<16}no reachable sender")
            return torch.zeros(dims.n_layers, dims.n_heads), {}
        (fast, fcost), t_fast = timed(run_all, fast_scores, model, batches, st, rec, reach)
        (attr, acost), t_attr = timed(run_all, attribution_scores, model, batches, st, rec, reach)
        reach_layers = sorted({h.layer for h in reach})
        idx = torch.linspace(0, len(reach_layers) - 1, args.naive_layers).round().long().unique().tolist()
        sub = [h for h in all_heads(dims) if h.layer in [reach_layers[i] for i in idx]]
        (naive, ncost), t_naive = timed(run_all, naive_scores, model, batches, st, rec, sub)
        cache_fwd = 2 * len(batches)  # one clean and one corrupt forward per batch
        blocks_per_fwd = ncost["token_layer_blocks"] / ncost["forwards"]
        per_sender_fwd = (ncost["forwards"] - cache_fwd) / len(sub)
        naive_fwd = per_sender_fwd * n_all + cache_fwd
        naive_all_s = t_naive / len(sub) * n_all  # cache forwards are counted in the per-sender time: conservative
        naive_all_blocks = naive_fwd * blocks_per_fwd
        d = max(float((naive[h] - fast[h]).abs() / args.pairs) for h in sub)
        max_diff = max(max_diff, d)
        mask = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.bool)
        mask[reach_layers] = True
        a, f = attr[mask].double(), fast[mask].double()
        rho = float(torch.corrcoef(torch.stack([a.argsort().argsort().double(), f.argsort().argsort().double()]))[0, 1])
        low = sum(minimum_blocks(b, st, rec, reach, dims.n_layers) for b in batches)  # the definition's minimum
        print(f"{st.group:<16}{naive_all_s:>14.1f}{t_fast:>9.1f}{t_attr:>9.1f}{naive_all_blocks:>15.3g}"
              f"{fcost['token_layer_blocks']:>13.3g}{naive_fwd:>11.0f}{d:>11.2e}{rho:>10.3f}"
              f"{100 * low / fcost['token_layer_blocks']:>7.1f}")
        tot["low"] += low
        stage_s[st.group] = t_fast
        tot["naive"] += naive_all_s
        tot["fast"] += t_fast
        tot["attr"] += t_attr
        tot["nb"] += naive_all_blocks
        tot["fb"] += fcost["token_layer_blocks"]
        return fast / args.pairs, {}

    discover(task_stages(task_named("entity_tracking")), list(task_stages(task_named("entity_tracking"))), dims, RECEIVERS_TOP_K, score)
    print(f"{'total':<16}{tot['naive']:>14.1f}{tot['fast']:>9.1f}{tot['attr']:>9.1f}{tot['nb']:>15.3g}{tot['fb']:>13.3g}")
    print("fast time share per stage: " + ", ".join(f"{g} {100 * t / tot['fast']:.0f}%" for g, t in stage_s.items())
          + f"; speed of light (definition's minimum blocks / fast blocks) {100 * tot['low'] / tot['fb']:.1f}%")
    print(f"speedup_fast_vs_naive={tot['naive'] / tot['fast']:.1f} block_ratio={tot['nb'] / tot['fb']:.1f} "
          f"speedup_attribution_vs_naive={tot['naive'] / tot['attr']:.1f} max_abs_diff={max_diff:.2e}")


if __name__ == "__main__":
    main()
