"""Exact fast path patching (SPEC §10.2): the same scores as `naive`, computed without per-sender full forwards.

(a) Sender step, position-local: with every head output frozen, only the residual at p_s changes, through MLPs.
    For each prompt, all reachable senders are rows of a batch of single tokens, chained layer by layer:
    r = h_in[l] + o_proj(z_clean with head h <- z_corrupt); r += MLP(norm(r)); for j > l: r += a_clean[j];
    r += MLP(norm(r)). Receivers' q/v are read off r at their layers; VF ends in the unembedding.
(b) Senders at or above the deepest receiver layer are skipped (score exactly 0).
(c) Receiver step, suffix-only: positions < p_s cannot change, so each (prompt, sender) row recomputes only the
    suffix p_s..last on top of the clean KV cache of the prefix, with the receivers' q/v patched at p_s.
(d) Caches hold only position p_s (and p'_s), on the model's device."""

from __future__ import annotations

from typing import Sequence

import torch

from etk.interventions.components import HeadId, n_units, site_spec
from etk.interventions.hooks import Capture, Patch, hooked
from etk.methods.path_patching.naive import answer_prob, per_clean, prob_dtype, undefined_prompts
from etk.methods.path_patching.stages import PPBatch, Receivers, Stage, corrupt_z_per_sender
from etk.models.arch import LlamaFamily
from etk.models.forward import output_cache
from etk.models.partial import LayerInputs, SharedPrefix


def _sender_chain(arch: LlamaFamily, stage: Stage, receivers: Receivers | None, senders: list[HeadId],
                  h_in: dict, z_clean: dict, z_corr: dict, a_clean: dict, recv_clean: dict, y: torch.Tensor):
    """Step 2 for all senders of a chunk of prompts. Returns ([n, S] answer probabilities) for VF, else
    {layer: [n, S, U_j, D]} receiver values."""
    dims = arch.dims
    H, D = dims.n_heads, dims.head_dim
    s_layer = torch.tensor([s.layer for s in senders], device=y.device)
    s_head = torch.tensor([s.head for s in senders], device=y.device)
    n, S = y.shape[0], len(senders)
    end = dims.n_layers if stage.receiver_site is None else receivers.max_layer
    r = torch.zeros(n, S, dims.d_model, dtype=h_in[0].dtype, device=y.device)
    recv = {j: recv_clean[j][:, None].expand(n, S, *recv_clean[j].shape[1:]).clone() for j in (receivers.layers if receivers else [])}
    for j in range(int(s_layer.min()), end + 1):
        if receivers is not None and j in recv:
            act = s_layer < j
            if act.any():
                x = arch.input_norm(j)(r[:, act])
                v = arch.proj(j, site_spec(receivers.site).module)(x)
                v = v.unflatten(-1, (n_units(dims, receivers.site), D))[:, :, receivers.units[j]]
                recv[j][:, act] = v
        if j == end:
            break
        new = s_layer == j
        if new.any():
            hs = s_head[new]
            z = z_clean[j][:, None].expand(n, int(new.sum()), H, D).clone()  # [n, s, H, D]
            idx = torch.arange(hs.shape[0], device=y.device)
            z[:, idx, hs] = z_corr[j][:, hs]
            r[:, new] = h_in[j][:, None] + arch.proj(j, "o_proj")(z.flatten(-2))
        old = s_layer < j
        if old.any():
            r[:, old] = r[:, old] + a_clean[j][:, None]
        act = s_layer <= j
        x = r[:, act]
        r[:, act] = x + arch.mlp(j)(arch.post_attn_norm(j)(x))
    if stage.receiver_site is None:
        logits = arch.lm_head(arch.final_norm(r))  # [n, S, V]
        return torch.softmax(logits.to(prob_dtype(logits)), -1).gather(-1, y[:, None, None].expand(n, S, 1))[..., 0]
    return recv


def _suffix_probs(model, arch: LlamaFamily, batch: PPBatch, prompts: torch.Tensor, start: torch.Tensor, p_s: torch.Tensor,
                  receivers: Receivers, recv: dict, max_rows: int, clean_run: tuple[dict, object] | None = None) -> torch.Tensor:
    """Step 3 for prompts [n] sharing one (p_s, last) and every sender [S]: [n, S] answer probabilities.

    Only the suffix p_s..last is recomputed, attending to the prompt's clean prefix K/V in place (shared by all its
    rows, `SharedPrefix`), and a (prompt, sender) row starts at layer start[S] (the shallowest receiver layer above
    the sender: below it nothing differs from the clean run). The rows of all start layers run in one pass: at
    layer j the rows of the senders with start <= j are active, the others join when j reaches their start with
    their clean residual. recv: {layer: [n, S, U_j, D]} the receivers' step-2 values. At most `max_rows` rows
    per forward. `clean_run` = (layer inputs {j: [B, T, d]}, K/V cache) of the batch's clean forward
    (`stage_caches`): read instead of running the prompts' clean forward again (None: run it, the reference)."""
    clean, dims = batch.clean, arch.dims
    L, U = dims.n_layers, n_units(arch.dims, receivers.site)
    ps, last = int(p_s[prompts[0]]), int(clean.roles["last"][prompts[0]])
    Ts, S = last - ps + 1, start.shape[0]
    order = start.argsort(stable=True)  # senders by start layer: the active ones are a prefix of this order
    st = start[order]
    recv = {j: v[:, order] for j, v in recv.items()}
    out = torch.empty(prompts.shape[0], S, dtype=prob_dtype(recv[next(iter(recv))]), device=prompts.device)
    n_per = max(1, max_rows // S)  # prompts per forward
    s_per = min(S, max_rows)  # senders per forward (fewer than S when one prompt's rows exceed max_rows)
    first = int(st.min())
    inputs = clean.model_inputs()
    for c0 in range(0, prompts.shape[0], n_per):
        pc = prompts[c0:c0 + n_per]
        n = pc.shape[0]
        if clean_run is not None:  # the batch's clean forward already holds them
            h_all, full_kv = clean_run
            h_clean = {j: h_all[j][pc, ps:last + 1] for j in range(first, L)}  # {j: [n, Ts, d]}
            kv = [(full_kv.layers[j].keys[pc, :, :ps], full_kv.layers[j].values[pc, :, :ps]) for j in range(L)]
        else:
            suffix = torch.arange(ps, last + 1, device=pc.device)[None].expand(n, -1)
            with LayerInputs(arch, suffix, range(first, L)) as h_clean:  # {j: [n, Ts, d]} clean residual entering j
                full = output_cache(arch.base.model(**{k: v[pc] for k, v in inputs.items()}, use_cache=True))
            kv = [(full.layers[j].keys[:, :, :ps], full.layers[j].values[:, :, :ps]) for j in range(L)]
        pos = clean.position_ids[pc, ps:last + 1]  # [n, Ts]
        cos, sin = arch.base.model.rotary_emb(h_clean[first], position_ids=pos)  # [n, Ts, D]
        with SharedPrefix(model, {j: a for j, (a, _) in enumerate(kv)}, {j: b for j, (_, b) in enumerate(kv)},
                          clean.attention_mask[pc, :ps].bool()):
            for s0 in range(0, S, s_per):
                sel = slice(s0, min(S, s0 + s_per))
                ss = st[sel]
                h = torch.empty(n, ss.shape[0], Ts, dims.d_model, dtype=h_clean[first].dtype, device=pc.device)
                k_prev = 0
                for j in range(int(ss.min()), L):
                    k = int((ss <= j).sum())  # active senders of this chunk
                    if k > k_prev:
                        h[:, k_prev:k] = h_clean[j][:, None]
                        k_prev = k
                    rows = lambda t: t[:, None].expand(n, k, *t.shape[1:]).reshape(n * k, *t.shape[1:])  # noqa: E731
                    patches = []
                    if j in recv:  # every active row's sender lies below j: all receivers of j take step-2 values
                        src = torch.zeros(n * k, 1, U, dims.head_dim, dtype=recv[j].dtype, device=pc.device)
                        src[:, 0, receivers.units[j]] = recv[j][c0:c0 + n, sel][:, :k].reshape(n * k, -1, dims.head_dim)
                        keep = torch.ones(n * k, 1, U, dtype=torch.bool, device=pc.device)
                        keep[:, :, receivers.units[j]] = False
                        patches.append(Patch(receivers.site, j, src, keep, torch.zeros(n * k, 1, dtype=torch.long,
                                                                                       device=pc.device)))
                    with hooked(model, patches=patches):
                        o = arch.layers[j](h[:, :k].reshape(n * k, Ts, -1), attention_mask=None, position_ids=rows(pos),
                                           position_embeddings=(rows(cos), rows(sin)))
                    h[:, :k] = (o[0] if isinstance(o, tuple) else o).view(n, k, Ts, -1)
                logits = arch.lm_head(arch.final_norm(h[:, :, -1]))  # [n, s, V]
                out[c0:c0 + n, sel] = answer_prob(logits.flatten(0, 1), clean.answer[pc].repeat_interleave(
                    ss.shape[0])).view(n, -1)
    res = torch.empty_like(out)
    res[:, order] = out
    return res


@torch.no_grad()
def stage_caches(model, batch: PPBatch, stage: Stage, receivers: Receivers | None,
                 draws: torch.Tensor | None = None, keep_clean: bool = False) -> dict:
    """One clean and one corrupt forward; what is kept is at p_s (clean) or p'_s (corrupt), on device. `draws`
    [B, L, H] (`sender_draws`, the paper's per-sender entity): each head's corrupt z is read at its own entity.
    `keep_clean` (receiver stages): also the clean run's layer inputs at every position and its K/V ("clean_run"),
    which the receiver step reads instead of a second clean forward."""
    arch = LlamaFamily.of(model)
    L = arch.dims.n_layers
    clean, y = batch.clean, batch.clean.answer
    p_s, p_c = batch.positions(stage)
    B = len(batch)
    site = receivers.site if receivers else None
    caps = [Capture("z", j, p_s[:, None]) for j in range(L)]
    caps += [Capture(site, j, p_s[:, None]) for j in (receivers.layers if receivers else [])]
    clean_run = None
    with LayerInputs(arch, None if keep_clean else p_s) as h_in, hooked(model, captures=caps) as cc:
        out = arch.base.model(**clean.model_inputs(), use_cache=keep_clean)
        p_clean = answer_prob(arch.lm_head(out.last_hidden_state[torch.arange(B), clean.roles["last"]]), y)
    if keep_clean:
        clean_run = (dict(h_in), output_cache(out))
        h_in = {j: h[torch.arange(B), p_s] for j, h in h_in.items()}  # [B, d] at p_s
    at = p_c[:, None] if draws is None else batch.entities(stage)  # [B, 1] or [B, E]
    with hooked(model, captures=[Capture("z", j, at) for j in range(L)]) as kc:
        arch.base.model(**batch.corrupt.model_inputs(), use_cache=False)
    z_corr = ({j: kc[("z", j)][:, 0] for j in range(L)} if draws is None
              else {j: corrupt_z_per_sender(kc[("z", j)], draws[:, j]) for j in range(L)})  # [B, H, D]
    z_clean = {j: cc[("z", j)][:, 0] for j in range(L)}  # [B, H, D]
    return {
        "p_s": p_s, "p_clean": p_clean, "h_in": dict(h_in), "z_clean": z_clean, "clean_run": clean_run,
        "z_corr": z_corr,
        "a_clean": {j: arch.proj(j, "o_proj")(z_clean[j].flatten(-2)) for j in range(L)},  # [B, d]
        "recv_all": {j: cc[(site, j)][:, 0] for j in (receivers.layers if receivers else [])},  # [B, U, D]
        "recv_clean": {j: cc[(site, j)][:, 0, receivers.units[j]] for j in (receivers.layers if receivers else [])},
    }


def sender_values(model, caches: dict, stage: Stage, receivers: Receivers | None, senders: list[HeadId], bb: torch.Tensor, y: torch.Tensor):
    """Step 2 (exact, position-local) for prompts `bb` and all senders."""
    pick = lambda d: {j: v[bb] for j, v in d.items()}  # noqa: E731
    return _sender_chain(LlamaFamily.of(model), stage, receivers, senders, pick(caches["h_in"]), pick(caches["z_clean"]),
                         pick(caches["z_corr"]), pick(caches["a_clean"]), pick(caches["recv_clean"]), y[bb])


@torch.no_grad()
def fast_scores(model, batch: PPBatch, stage: Stage, receivers: Receivers | None, senders: Sequence[HeadId],
                chunk_rows: int = 4096, suffix_chunk_rows: int = 512,
                draws: torch.Tensor | None = None, reuse_clean: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """Sum over the batch of (p_patched - p_clean) / p_clean per sender: [n_layers, n_heads]; same as `naive`.

    `chunk_rows` bounds the (prompt, sender) rows of one sender-step chunk; `suffix_chunk_rows` those of one
    receiver-step forward (rows share their prompt's prefix K/V; each holds its own suffix). `reuse_clean=False`
    runs each receiver-step prompt's clean forward again (the reference: one forward more per prompt)."""
    arch = LlamaFamily.of(model)
    dims = arch.dims
    L, H = dims.n_layers, dims.n_heads
    clean, y = batch.clean, batch.clean.answer
    B = len(batch)
    c = stage_caches(model, batch, stage, receivers, draws, keep_clean=reuse_clean and receivers is not None)
    p_s, p_clean = c["p_s"], c["p_clean"]
    senders = sorted(senders)
    out = torch.zeros(L, H, dtype=torch.float64, device=y.device)
    blocks = 2 * int(clean.attention_mask.sum()) * L
    if not senders:
        return out, {"forwards": 2, "token_layer_blocks": blocks, "undefined_prompts": undefined_prompts(p_clean)}
    S = len(senders)
    sl = torch.tensor([s.layer for s in senders], device=y.device)
    sh = torch.tensor([s.head for s in senders], device=y.device)
    per_chunk = max(1, chunk_rows // S)
    end = L if receivers is None else receivers.max_layer
    if receivers is not None:  # shallowest receiver layer above each sender layer
        rl = torch.tensor(receivers.layers, device=y.device)
        start_of = torch.tensor([int(rl[rl > layer].min()) if (rl > layer).any() else L for layer in range(L)],
                                device=y.device)
    for b0 in range(0, B, per_chunk):
        bb = torch.arange(b0, min(B, b0 + per_chunk), device=y.device)
        res = sender_values(model, c, stage, receivers, senders, bb, y)
        blocks += int(sum(end - s.layer for s in senders)) * bb.shape[0]
        if receivers is None:
            p = res  # [n, S]
        else:
            p = torch.empty(bb.shape[0], S, dtype=c["p_clean"].dtype, device=y.device)
            keys = torch.stack([p_s[bb], clean.roles["last"][bb]], 1)  # [n, 2]: prompts of equal suffix share a pass
            uniq, inv = keys.unique(dim=0, return_inverse=True)
            for u in range(uniq.shape[0]):
                loc = (inv == u).nonzero()[:, 0]
                ps, last = uniq[u].tolist()
                p[loc] = _suffix_probs(model, arch, batch, bb[loc], start_of[sl], p_s, receivers,
                                       {j: v[loc] for j, v in res.items()}, suffix_chunk_rows, c["clean_run"])
                # the rows' suffix layers (plus, in the reference, one more clean forward per prompt)
                again = 0 if c["clean_run"] is not None else (last + 1) * L
                blocks += (int((L - start_of[sl]).sum()) * (last - ps + 1) + again) * loc.shape[0]
        rel = per_clean(p - p_clean[bb, None], p_clean[bb])  # [n, S]
        out.index_put_((sl, sh), rel.double().sum(0), accumulate=True)
    return out, {"forwards": 2, "token_layer_blocks": blocks, "undefined_prompts": undefined_prompts(p_clean)}
