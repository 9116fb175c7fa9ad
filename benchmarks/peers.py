"""etk's exact 4-stage path patching against the same definition written in nnsight (0.8), on the same model and
pairs in one process, one after the other.

`--layers-every k` (the quick mode) runs nnsight on every k-th sender layer only and extrapolates its time, as
benchmarks/path_patching.py does for the naive algorithm. The nnsight side is written as an experienced nnsight user would: per sender layer, the layer's heads batched into
one trace (the prompts repeated once per head), only the needed positions saved, no edits below the sender's layer;
step 2 freezes every head output at its clean value, except the sender's at p_s (MLPs recompute) and reads the
receivers' q / v at p_s; step 3 reruns the clean prompt with only those receivers patched (SPEC §2.3). Both sides
use the receivers etk's stage loop picks, so every stage computes the same numbers. A float64 run of etk's fast
algorithm is the reference both are measured against.

    python benchmarks/peers.py [--model smollm2_tracker] [--pairs 21] [--quick]

nnsight is a `dev` extra only; etk never imports it. Last line: speedup_vs_nnsight=<x> max_abs_diff=<d>"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _setup import load  # noqa: E402  (repo on sys.path, hub off)
from omegaconf import open_dict  # noqa: E402

from etk.methods.path_patching.discover import discover  # noqa: E402
from etk.methods.path_patching.fast import fast_scores  # noqa: E402
from etk.methods.path_patching.naive import answer_prob  # noqa: E402
from etk.methods.path_patching.stages import discovery_schedule, pp_loader, task_stages  # noqa: E402
from etk.models.arch import LlamaFamily  # noqa: E402
from etk.tasks import task_named
from etk.tasks.entity_tracking.data import task_examples  # noqa: E402


def nnsight_stage(nm, arch, batch, stage, receivers, layers: list[int]) -> tuple[torch.Tensor, int, float]:
    """Sum over the batch of (p - p_clean) / p_clean for every head of `layers`: [L, H], the traces run and the
    seconds of the two cache traces."""
    t0 = time.perf_counter()
    d = arch.dims
    L, H, D = d.n_layers, d.n_heads, d.head_dim
    attn = lambda j: nm.model.layers[j].self_attn  # noqa: E731
    clean, corrupt, y = batch.clean, batch.corrupt, batch.clean.answer
    B = len(batch)
    p_s, p_c = batch.positions(stage)
    b = torch.arange(B)
    inputs = clean.model_inputs()
    z_clean, z_corr, last_logits = [], [], []  # lists filled inside the traces (bindings made there do not escape)
    with nm.trace(**inputs):  # the caches: clean z at every position, clean p(y)
        for j in range(L):
            z_clean.append(attn(j).o_proj.input.save())  # [B, T, H*D]
        last_logits.append(nm.lm_head.output.save())
    with nm.trace(**corrupt.model_inputs()):  # corrupt z, only at p'_s
        for j in range(L):
            z_corr.append(attn(j).o_proj.input[b, p_c].save())  # [B, H*D]
    logits = last_logits[0]
    t_cache = time.perf_counter() - t0
    p_clean = answer_prob(logits[b, clean.roles["last"]], y)
    traces = 2
    R = B * H
    rb, rh = torch.arange(R) // H, torch.arange(R) % H  # row -> prompt, head
    rep = {k: v.repeat_interleave(H, 0) for k, v in inputs.items()}
    ps_r, last_r, y_r = p_s[rb], clean.roles["last"][rb], y[rb]
    out = torch.zeros(L, H, dtype=torch.float64)
    site = None if receivers is None else receivers.site
    for layer in layers:
        zl = z_clean[layer].repeat_interleave(H, 0).clone()  # [R, T, H*D]
        zl.view(R, -1, H, D)[torch.arange(R), ps_r, rh] = z_corr[layer].view(B, H, D)[rb, rh]
        later = [j for j in (receivers.layers if receivers else []) if j > layer]
        got, rec = [], {}
        with nm.trace(**rep):  # step 2: sender patched, every other head output frozen at its clean value
            attn(layer).o_proj.input[:] = zl
            for j in range(layer + 1, L):  # in the order the forward reaches them: a layer's q / v before its o_proj
                if j in later:
                    rec[j] = getattr(attn(j), f"{site}_proj").output[torch.arange(R), ps_r].save()
                attn(j).o_proj.input[:] = z_clean[j].repeat_interleave(H, 0)
            if site is None:
                got.append(nm.lm_head.output[torch.arange(R), last_r].save())
        traces += 1
        if site is not None:
            if not later:
                continue
            with nm.trace(**rep):  # step 3: only the receivers' q / v at p_s patched, everything else free
                for j in later:
                    cols = torch.cat([torch.arange(u * D, (u + 1) * D) for u in receivers.units[j]])
                    o = getattr(attn(j), f"{site}_proj").output
                    o[torch.arange(R)[:, None], ps_r[:, None], cols[None]] = rec[j][:, cols]
                got.append(nm.lm_head.output[torch.arange(R), last_r].save())
            traces += 1
        p = answer_prob(got[0], y_r).view(B, H)
        out[layer] = ((p - p_clean[:, None]) / p_clean[:, None]).double().sum(0)
    return out, traces, t_cache


def main() -> None:
    t_process = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_tracker")
    ap.add_argument("--pairs", type=int, default=21)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--layers-every", type=int, default=1,
                    help="nnsight scores every k-th reachable sender layer; its time is extrapolated to all of them")
    ap.add_argument("--quick", action="store_true", help="8 pairs, nnsight on every 6th sender layer (< 10 min on 2 cores)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.layers_every = 8, 6
    try:
        from nnsight import NNsight
    except ImportError:
        sys.exit("benchmarks/peers.py needs nnsight: pip install -e '.[dev]' (nnsight is a dev extra only)")
    cfg, model, tok = load(args.model)
    arch = LlamaFamily(model)
    dims = arch.dims
    data = cfg.data.copy()
    with open_dict(data):
        data.n_examples = args.pairs
    batch = next(iter(pp_loader(task_named("entity_tracking"), tok, task_examples(data, tok), args.seed, args.pairs)))
    ref_model = copy.deepcopy(model).double()
    nm = NNsight(arch.base)
    print(f"model={args.model} layers={dims.n_layers} heads={dims.n_heads} pairs={args.pairs} "
          f"tokens/prompt={batch.clean.input_ids.shape[1]} threads={torch.get_num_threads()}")
    if args.layers_every > 1:
        print(f"nnsight runs every {args.layers_every}th sender layer; its time is extrapolated to all of them "
              "(scores compared on the layers it ran)")
    print(f"{'stage':<16}{'etk s':>8}{'nnsight s':>11}{'x':>7}{'etk fwd':>9}{'nn traces':>11}"
          f"{'max|etk-nn|':>13}{'etk-f64':>10}{'nn-f64':>10}")
    tot = {"etk": 0.0, "nn": 0.0}
    t_start = time.perf_counter()
    worst = 0.0

    def score(st, rec, reach):
        nonlocal worst
        if not reach:
            return torch.zeros(dims.n_layers, dims.n_heads), {}
        t0 = time.perf_counter()
        ours, cost = fast_scores(model, batch, st, rec, reach)
        t_etk = time.perf_counter() - t0
        all_layers = sorted({h.layer for h in reach})
        layers = all_layers[::args.layers_every]
        t0 = time.perf_counter()
        theirs, traces, t_cache = nnsight_stage(nm, arch, batch, st, rec, layers)
        t_nn = t_cache + (time.perf_counter() - t0 - t_cache) * len(all_layers) / len(layers)  # extrapolated
        ref, _ = fast_scores(ref_model, batch.to("cpu"), st, rec, [h for h in reach if h.layer in layers])  # compared ones
        n = args.pairs
        mask = torch.zeros(dims.n_layers, dims.n_heads, dtype=torch.bool)
        mask[layers] = True
        diff = float(((ours - theirs) / n)[mask].abs().max())
        d64 = lambda s: float(((s.double() - ref) / n)[mask].abs().max())  # noqa: E731
        worst = max(worst, diff)
        tot["etk"] += t_etk
        tot["nn"] += t_nn
        print(f"{st.group:<16}{t_etk:>8.1f}{t_nn:>11.1f}{t_nn / t_etk:>7.1f}{cost['forwards']:>9}{traces:>11}"
              f"{diff:>13.2e}{d64(ours):>10.2e}{d64(theirs):>10.2e}")
        return ours / n, {}

    discover(task_stages(task_named("entity_tracking")), list(task_stages(task_named("entity_tracking"))), dims, discovery_schedule({}, cfg.model, dims, task_named("entity_tracking"))["receivers_top_k"], score)
    print(f"{'total':<16}{tot['etk']:>8.1f}{tot['nn']:>11.1f}{tot['nn'] / tot['etk']:>7.1f}")
    print(f"benchmark wall time {time.perf_counter() - t_start:.0f} s (with the float64 reference; "
          f"{t_start - t_process:.0f} s of loading before it)")
    print(f"speedup_vs_nnsight={tot['nn'] / tot['etk']:.1f} max_abs_diff={worst:.2e}")


if __name__ == "__main__":
    main()
