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

from collections import defaultdict
from typing import Sequence

import torch
from transformers import DynamicCache

from etk.interventions.components import HeadId, n_units
from etk.interventions.hooks import Capture, Patch, hooked
from etk.methods.path_patching.naive import answer_prob, per_clean, undefined_prompts
from etk.methods.path_patching.stages import PPBatch, Receivers, Stage
from etk.models.arch import LlamaFamily
from etk.models.forward import output_cache
from etk.models.partial import LayerInputs, forward_from_layer


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
                v = arch.proj(j, "q_proj" if receivers.site == "q" else "v_proj")(x)
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
        return torch.softmax(logits.float(), -1).gather(-1, y[:, None, None].expand(n, S, 1))[..., 0]
    return recv


def _suffix_probs(model, arch: LlamaFamily, batch: PPBatch, rows_b: torch.Tensor, row_start: torch.Tensor,
                  p_s: torch.Tensor, receivers: Receivers, recv_rows: dict, chunk_rows: int) -> torch.Tensor:
    """Step 3 for rows (prompt index rows_b [R]) sharing one (p_s, last): only the suffix p_s..last is recomputed,
    on the clean prefix KV cache, and only from layer row_start [R] (the shallowest receiver layer above the
    row's sender: nothing below it can differ from the clean run)."""
    clean = batch.clean
    dims = arch.dims
    b0 = rows_b.unique()
    ps = int(p_s[b0[0]])
    last = int(clean.roles["last"][b0[0]])
    suffix = torch.arange(ps, last + 1, device=rows_b.device)
    with LayerInputs(arch, suffix[None].expand(b0.shape[0], -1)) as h_suffix:  # clean residuals [n, Ts, d]
        full = output_cache(arch.base.model(**{k: v[b0] for k, v in clean.model_inputs().items()}, use_cache=True))
    where = torch.full((int(rows_b.max()) + 1,), -1, dtype=torch.long, device=rows_b.device)
    where[b0] = torch.arange(b0.shape[0], device=rows_b.device)
    local = where[rows_b]
    out = torch.empty(rows_b.shape[0], device=rows_b.device)
    for start_layer in row_start.unique().tolist():
        sel = (row_start == start_layer).nonzero()[:, 0]
        for c0 in range(0, sel.shape[0], chunk_rows):
            it = sel[c0:c0 + chunk_rows]
            rb, lb = rows_b[it], local[it]
            R = rb.shape[0]
            cache = DynamicCache([(lay.keys[lb, :, :ps], lay.values[lb, :, :ps]) for lay in full.layers],
                                 config=arch.base.config)
            patches = []
            for j in receivers.layers:
                if j < start_layer:
                    continue  # below the start layer the row's receivers hold their clean values
                U = n_units(dims, receivers.site)
                src = torch.zeros(R, 1, U, dims.head_dim, dtype=recv_rows[j].dtype, device=rb.device)
                src[:, 0, receivers.units[j]] = recv_rows[j][it]
                keep = torch.ones(R, 1, U, dtype=torch.bool, device=rb.device)
                keep[:, :, receivers.units[j]] = False
                patches.append(Patch(receivers.site, j, src, keep, torch.zeros(R, 1, dtype=torch.long, device=rb.device)))
            with hooked(model, patches=patches):
                hid = forward_from_layer(model, h_suffix[start_layer][lb], start_layer, clean.attention_mask[rb, :last + 1],
                                         clean.position_ids[rb, ps:last + 1], cache)
            out[it] = answer_prob(arch.lm_head(hid[:, -1]), clean.answer[rb])
    return out


@torch.no_grad()
def stage_caches(model, batch: PPBatch, stage: Stage, receivers: Receivers | None) -> dict:
    """One clean and one corrupt forward; everything kept is at p_s (clean) or p'_s (corrupt), on device."""
    arch = LlamaFamily.of(model)
    L = arch.dims.n_layers
    clean, y = batch.clean, batch.clean.answer
    p_s, p_c = batch.positions(stage)
    B = len(batch)
    site = receivers.site if receivers else None
    caps = [Capture("z", j, p_s[:, None]) for j in range(L)]
    caps += [Capture(site, j, p_s[:, None]) for j in (receivers.layers if receivers else [])]
    with LayerInputs(arch, p_s) as h_in, hooked(model, captures=caps) as cc:
        hid = arch.base.model(**clean.model_inputs(), use_cache=False).last_hidden_state
        p_clean = answer_prob(arch.lm_head(hid[torch.arange(B), clean.roles["last"]]), y)
    with hooked(model, captures=[Capture("z", j, p_c[:, None]) for j in range(L)]) as kc:
        arch.base.model(**batch.corrupt.model_inputs(), use_cache=False)
    z_clean = {j: cc[("z", j)][:, 0] for j in range(L)}  # [B, H, D]
    return {
        "p_s": p_s, "p_clean": p_clean, "h_in": dict(h_in), "z_clean": z_clean,
        "z_corr": {j: kc[("z", j)][:, 0] for j in range(L)},
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
                chunk_rows: int = 4096, suffix_chunk_rows: int = 512) -> tuple[torch.Tensor, dict[str, int]]:
    """Sum over the batch of (p_patched - p_clean) / p_clean per sender: [n_layers, n_heads]; same as `naive`.

    `chunk_rows` bounds the (prompt, sender) rows of one sender-step chunk; `suffix_chunk_rows` those of one
    receiver-step forward (each row holds a copy of its prompt's prefix KV cache)."""
    arch = LlamaFamily.of(model)
    dims = arch.dims
    L, H = dims.n_layers, dims.n_heads
    clean, y = batch.clean, batch.clean.answer
    B = len(batch)
    c = stage_caches(model, batch, stage, receivers)
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
            rows_b = bb[:, None].expand(-1, S).reshape(-1)  # [n*S] prompt of each row
            recv_rows = {j: v.reshape(-1, *v.shape[2:]) for j, v in res.items()}
            p = torch.empty(rows_b.shape[0], device=y.device)
            keys = torch.stack([p_s[rows_b], clean.roles["last"][rows_b]], 1)
            buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, (a, e) in enumerate(keys.tolist()):
                buckets[(a, e)].append(i)
            rows_start = start_of[sl].repeat(bb.shape[0])  # [n*S]: layer where each row's recompute starts
            for (ps, last), idx in buckets.items():
                it = torch.tensor(idx, device=y.device)
                p[it] = _suffix_probs(model, arch, batch, rows_b[it], rows_start[it], p_s, receivers,
                                      {j: v[it] for j, v in recv_rows.items()}, suffix_chunk_rows)
                blocks += int((L - rows_start[it]).sum()) * (last - ps + 1) + len(set(rows_b[it].tolist())) * (last + 1) * L
            p = p.view(bb.shape[0], S)
        rel = per_clean(p - p_clean[bb, None], p_clean[bb])  # [n, S]
        out.index_put_((sl, sh), rel.double().sum(0), accumulate=True)
    return out, {"forwards": 2, "token_layer_blocks": blocks, "undefined_prompts": undefined_prompts(p_clean)}
