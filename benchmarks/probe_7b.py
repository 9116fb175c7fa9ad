"""A 7B-shaped probe: the per-layer cost of each kernel the study runs, on ONE Llama-7B-shaped decoder layer with
random fp32 weights (d_model 4096, 32 heads = 32 KV heads, head_dim 128, MLP 11008, vocab 32000; no download).
Each kernel is one layer call, timed as the median of --repeats after a warm-up (CUDA synchronised); its
s_per_token_layer = seconds / (rows x tokens) is what benchmarks/scale_plan.py multiplies its block counts by.
On CUDA every kernel runs with TF32 off (exact fp32) and on. Random weights, one layer: an input to an ESTIMATE.

    python benchmarks/probe_7b.py --device cuda [--tokens 55] [--repeats 10] [--out outputs/probe_7b.json]

Last line: probe_7b: device=<d> plain_s_per_token_layer=<x> receiver=<x> vital=<x> dcm=<x> knockout=<x> loop_s=<x>"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _setup import ROOT

D, H, DFF, VOCAB, L7B = 4096, 32, 11008, 32000, 32
SHORT = {"plain": "plain_s_per_token_layer", "receiver_chunk": "receiver", "vital_chunk": "vital", "dcm_step": "dcm",
         "knockout_rows": "knockout"}


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of fn() after one warm-up call."""
    import torch

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    once()
    return statistics.median(once() for _ in range(repeats))


def kernels(model, dev, T: int, scale: float) -> dict:
    """{name: (fn, rows, tokens)}: one layer call of each kernel (rows x tokens new positions)."""
    import torch
    from transformers import DynamicCache

    from etk.methods.mean_ablation.vital import _Background
    from etk.models.arch import LlamaFamily
    from etk.models.forward import cache_kwargs
    from etk.models.partial import SharedPrefix

    arch = LlamaFamily.of(model)
    layer, rot, Dh = arch.layers[0], arch.base.model.rotary_emb, D // H
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=gen)  # noqa: E731
    rows = lambda r: max(1, int(r * scale))  # noqa: E731
    ck = lambda c: cache_kwargs(model, c)  # noqa: E731

    def rope(R: int, start: int, n: int):  # position_ids [R, n] and (cos, sin) [R, n, Dh]
        pos = torch.arange(start, start + n, device=dev)[None].expand(R, n)
        return pos, rot(torch.zeros(1, device=dev), position_ids=pos)

    def suffix_mask(R: int, P: int, n: int, blocked: int | None = None):  # [R, 1, n, P + n]: prefix + causal suffix
        ok = torch.arange(P + n, device=dev)[None, :] <= P + torch.arange(n, device=dev)[:, None]
        if blocked is not None:
            ok[:, blocked] = False  # knockout: one blocked key
        return torch.zeros(n, P + n, device=dev).masked_fill(~ok, torch.finfo(torch.float32).min).expand(R, 1, n, P + n)

    out = {}
    B = rows(8)  # 1. plain: B prompts x T tokens, causal (sdpa, no mask)
    h, (pos, pe) = rnd(B, T, D), rope(B, 0, T)
    out["plain"] = (lambda: layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe), B, T)

    R, Ts, P = rows(512), 8, T - 8  # 2. receiver: R rows x Ts suffix tokens on one prompt's prefix K/V [1, H, P, Dh]
    pk, pv, hr, (pos_r, pe_r) = rnd(1, H, P, Dh), rnd(1, H, P, Dh), rnd(R, Ts, D), rope(R, P, Ts)
    valid = torch.ones(1, P, dtype=torch.bool, device=dev)

    def receiver():
        with SharedPrefix(model, {0: pk}, {0: pv}, valid):
            return layer(hr, attention_mask=None, position_ids=pos_r, position_embeddings=pe_r)
    out["receiver_chunk"] = (receiver, R, Ts)

    N = min(64, rows(2048))  # 3. vital: K configs x N prompts, 3 tokens each, on the background K/V [N, H, T, Dh]
    K = max(1, rows(2048) // N)
    bk, bv, hv, (pos_v, pe_v) = rnd(N, H, T, Dh), rnd(N, H, T, Dh), rnd(K * N, 3, D), rope(K * N, T - 3, 3)
    mask_v = suffix_mask(K * N, T, 3)
    out["vital_chunk"] = (lambda: layer(hv, attention_mask=mask_v, position_ids=pos_v, position_embeddings=pe_v,
                                        use_cache=True, **ck(_Background([bk], [bv], K))), K * N, 3)

    Bd = rows(32)  # 4. dcm: Bd rows x Ts suffix tokens on a prefix cache; a per-(row, head) mask scales z (grad only)
    hd, (pos_d, pe_d), mask_d = rnd(Bd, Ts, D), rope(Bd, P, Ts), suffix_mask(Bd, P, Ts)
    dk, dv = rnd(Bd, H, P, Dh), rnd(Bd, H, P, Dh)
    m = torch.full((Bd, 1, H, 1), 0.5, device=dev, requires_grad=True)

    def dcm():
        hook = layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, a: ((a[0].unflatten(-1, (H, Dh)) * m).flatten(-2),))  # z [Bd, Ts, H*Dh] * mask
        try:
            with torch.enable_grad():
                cache = DynamicCache([(dk, dv)], config=model.config)
                x = hd + 0.0 * m.sum()  # the input depends on the mask, as a later layer's does: backward through it all
                layer(x, attention_mask=mask_d, position_ids=pos_d, position_embeddings=pe_d, use_cache=True,
                      **ck(cache)).sum().backward()
        finally:
            hook.remove()
            m.grad = None
    out["dcm_step"] = (dcm, Bd, Ts)

    Nk, Pk = 16, T - 3  # 5. knockout: cfg x Nk rows x 3 tokens from the blocked query on; prefix K/V repeated per cfg
    cfg = max(1, rows(256) // Nk)
    kk, kv = rnd(Nk, H, Pk, Dh), rnd(Nk, H, Pk, Dh)
    hk, (pos_k, pe_k), mask_k = rnd(cfg * Nk, 3, D), rope(cfg * Nk, Pk, 3), suffix_mask(cfg * Nk, Pk, 3, blocked=10)

    def knockout():
        cache = DynamicCache([(kk.repeat(cfg, 1, 1, 1), kv.repeat(cfg, 1, 1, 1))], config=model.config)
        return layer(hk, attention_mask=mask_k, position_ids=pos_k, position_embeddings=pe_k, use_cache=True, **ck(cache))
    out["knockout_rows"] = (knockout, cfg * Nk, 3)
    return out


def loop_seconds(repeats: int) -> float:
    """One Lightning predict loop on a trivial module and one empty batch: the fixed per-loop cost."""
    import lightning as L

    from etk.runtime import quiet_dependencies

    quiet_dependencies()  # no banners: one loop's round trip is what is timed
    import torch

    class Trivial(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def predict_step(self, batch, batch_idx):
            return None

    module = Trivial()
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader([torch.zeros(0)], batch_size=None)
    return timed(lambda: trainer.predict(module, loader, return_predictions=False), repeats, False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokens", type=int, default=55, help="prompt length T (7-box prompts, Llama tokenizer)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per kernel (default 3 CPU / 10 CUDA)")
    ap.add_argument("--row-scale", type=float, default=1.0, help="shrink every kernel's rows (quick CPU runs)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "probe_7b.json")
    args = ap.parse_args()
    import torch

    from etk.models.tiny import tiny_llama

    cuda = args.device == "cuda"
    repeats = args.repeats or (10 if cuda else 3)
    torch.set_grad_enabled(False)
    model = tiny_llama(VOCAB, n_layers=1, n_heads=H, n_kv_heads=H, d_model=D, d_mlp=DFF).to(args.device)
    ks = kernels(model, torch.device(args.device), args.tokens, args.row_scale)
    modes = [("fp32", False), ("tf32", True)] if cuda else [("fp32", False)]
    res = {}
    for name, (fn, R, t) in ks.items():
        res[name] = {"rows": R, "tokens": t}
        for mode, tf32 in modes:
            if cuda:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            s = timed(fn, repeats, cuda)
            res[name][mode] = {"seconds": s, "s_per_token_layer": s / (R * t)}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    loop_s = loop_seconds(max(3, repeats // 2))
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{'kernel':<16}{'rows':>6}{'tokens':>7}" + "".join(f"{m + ' s/call':>14}{m + ' s/tok-layer':>18}"
                                                          for m, _ in modes))
    for name, r in res.items():
        print(f"{name:<16}{r['rows']:>6}{r['tokens']:>7}" + "".join(
            f"{r[m]['seconds']:>14.4g}{r[m]['s_per_token_layer']:>18.4g}" for m, _ in modes))
    per_f = {m: res["plain"][m]["s_per_token_layer"] * args.tokens * L7B * 1e3 for m, _ in modes}
    print(f"loop_round_trip {loop_s:.3f} s; one 7B prompt forward (T={args.tokens}, 32 layers) ~ "
          + ", ".join(f"{m} {v:.2f} ms" for m, v in per_f.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": device, "device_type": args.device, "dtype": "float32", "torch": torch.__version__,
        "attn_implementation": model.config._attn_implementation, "tokens": args.tokens, "repeats": repeats,
        "row_scale": args.row_scale, "dims": {"d_model": D, "n_heads": H, "d_mlp": DFF, "vocab": VOCAB},
        "kernels": res, "loop_round_trip": {"seconds": loop_s}, "ms_per_7b_forward": per_f}, indent=1))
    print(f"wrote {args.out}")
    line = " ".join(f"{SHORT[k]}={res[k]['fp32']['s_per_token_layer']:.3g}" for k in SHORT)
    tf = (" tf32 " + " ".join(f"{SHORT[k]}={res[k]['tf32']['s_per_token_layer']:.3g}" for k in SHORT)) if cuda else ""
    print(f"probe_7b: device={device.replace(' ', '_')} {line} loop_s={loop_s:.3g}{tf}")


if __name__ == "__main__":
    main()
