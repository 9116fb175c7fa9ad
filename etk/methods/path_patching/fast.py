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
from etk.models.partial import LayerInputs, SharedPrefix, top_layer_at
from etk.interventions.prefix import memory_budget


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
                  receivers: Receivers, recv: dict, max_rows: int, clean_run: tuple[dict, object] | None = None,
                  top_last_only: bool = False) -> torch.Tensor:
    """Step 3 for prompts [n] sharing one (p_s, last) and every sender [S]: [n, S] answer probabilities.

    Only the suffix p_s..last is recomputed, attending to the prompt's clean prefix K/V in place (shared by all its
    rows, `SharedPrefix`), and a (prompt, sender) row starts at layer start[S] (the shallowest receiver layer above
    the sender: below it nothing differs from the clean run). The rows of all start layers run in one pass: at
    layer j the rows of the senders with start <= j are active, the others join when j reaches their start with
    their clean residual. recv: {layer: [n, S, U_j, D]} the receivers' step-2 values. At most `max_rows` rows
    per forward. `clean_run` = (layer inputs {j: [B, T, d]}, K/V cache) of the batch's clean forward
    (`stage_caches`): read instead of running the prompts' clean forward again (None: run it, the reference).
    `top_last_only`: at the top layer only `last` goes through the MLP (the other suffix tokens' outputs feed
    nothing: they run attention only, for its K/V); False runs the whole layer at every token (the reference)."""
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
                    x = h[:, :k].reshape(n * k, Ts, -1)
                    with hooked(model, patches=patches):
                        if top_last_only and j == L - 1 and Ts > 1:
                            h[:, :k, -1] = top_layer_at(arch, x, torch.full((n * k,), Ts - 1, device=pc.device),
                                                        attention_mask=None, position_ids=rows(pos),
                                                        position_embeddings=(rows(cos), rows(sin))).view(n, k, -1)
                            continue
                        o = arch.layers[j](x, attention_mask=None, position_ids=rows(pos),
                                           position_embeddings=(rows(cos), rows(sin)))
                    h[:, :k] = (o[0] if isinstance(o, tuple) else o).view(n, k, Ts, -1)
                logits = arch.lm_head(arch.final_norm(h[:, :, -1]))  # [n, s, V]
                out[c0:c0 + n, sel] = answer_prob(logits.flatten(0, 1), clean.answer[pc].repeat_interleave(
                    ss.shape[0])).view(n, -1)
    res = torch.empty_like(out)
    res[:, order] = out
    return res


def _clean_run(model, batch: PPBatch, pos: torch.Tensor, sites: Sequence[str], layers: Sequence[int],
               keep_full: bool) -> dict:
    """One clean forward: z at pos [B, R] of every layer, `sites` (q, k, v) at pos of `layers`, the layer inputs at
    pos, the answer's probability p_clean [B]; with `keep_full` also the layer inputs at every position and the K/V
    cache ("full": what the receiver step reads instead of a second clean forward)."""
    arch = LlamaFamily.of(model)
    L = arch.dims.n_layers
    clean = batch.clean
    B = len(batch)
    caps = [Capture("z", j, pos) for j in range(L)] + [Capture(site, j, pos) for site in sites for j in layers]
    with LayerInputs(arch, None if keep_full else pos) as h_in, hooked(model, captures=caps) as cc:
        out = arch.base.model(**clean.model_inputs(), use_cache=keep_full)
        p_clean = answer_prob(arch.lm_head(out.last_hidden_state[torch.arange(B), clean.roles["last"]]), batch.clean.answer)
    b = torch.arange(B, device=pos.device)[:, None]
    return {"p_clean": p_clean, "z": {j: cc[("z", j)] for j in range(L)},  # [B, R, H, D]
            "site": {(site, j): cc[(site, j)] for site in sites for j in layers},  # [B, R, U, D]
            "h_in": {j: h[b, pos] for j, h in h_in.items()} if keep_full else dict(h_in),  # [B, R, d]
            "full": (dict(h_in), output_cache(out)) if keep_full else None}


def _corrupt_z(model, batch: PPBatch, at: torch.Tensor) -> dict:
    """One corrupt forward: z at positions at [B, C] of every layer, {layer: [B, C, H, D]}."""
    L = LlamaFamily.of(model).dims.n_layers
    with hooked(model, captures=[Capture("z", j, at) for j in range(L)]) as kc:
        LlamaFamily.of(model).base.model(**batch.corrupt.model_inputs(), use_cache=False)
    return {j: kc[("z", j)] for j in range(L)}


def _corrupt_at(batch: PPBatch, stage: Stage) -> torch.Tensor:
    """[B, C] the corrupt positions a stage reads: p'_s, then (for a drawn-entity stage) every entity position, which
    per-sender draws (`sender_draws`) pick from."""
    _, p_c = batch.positions(stage)
    return torch.cat([p_c[:, None], batch.entities(stage)], 1) if stage.corrupt_role.endswith("[source_box]") else p_c[:, None]


def _pick_corrupt(z_at: dict, draws: torch.Tensor | None) -> dict:
    """{layer: [B, H, D]} the corrupt z of each head from `_corrupt_at`'s columns: p'_s, or each head's drawn entity."""
    if draws is None:
        return {j: z[:, 0] for j, z in z_at.items()}
    return {j: corrupt_z_per_sender(z[:, 1:], draws[:, j]) for j, z in z_at.items()}


class StageRuns:
    """The clean and the corrupt forward of each batch, run once for every stage of a discovery (SPEC §10.2): the
    stages' positions (their sender roles, their corrupt positions) are known in advance, so one clean forward
    captures z, q/k/v and the layer inputs at all of them and one corrupt forward z at all of theirs; each stage reads
    its own columns. The same tensors as per-stage forwards, so the scores are unchanged. The clean run's every-position
    layer inputs and K/V (the receiver step's prefix) are kept while they fit `max_mb` (`auto`: from free memory),
    else a receiver stage runs that clean forward again. Batches are keyed by their index and checked by token ids."""

    def __init__(self, stages: Sequence[Stage], max_mb: float | str = "auto"):
        self.stages = list(stages)
        self.roles = sorted({s.sender_role for s in self.stages})
        self.sites = sorted({s.receiver_site for s in self.stages if s.receiver_site})
        self.max_mb, self.used = max_mb, 0
        self.batches: dict[int, dict] = {}
        self.forwards = 0  # clean and corrupt forwards run (2 per batch when the full clean run fits)

    def get(self, model, batch: PPBatch, batch_idx: int) -> dict:
        run = self.batches.get(batch_idx)
        if run is not None and torch.equal(run["ids"], batch.clean.input_ids) \
                and torch.equal(run["corrupt_ids"], batch.corrupt.input_ids):  # (False for another shape too)
            return run
        arch = LlamaFamily.of(model)
        dims = arch.dims
        B, T = batch.clean.input_ids.shape
        full_bytes = dims.n_layers * B * T * (dims.d_model + 2 * dims.n_kv_heads * dims.head_dim) * \
            next(arch.base.parameters()).element_size()
        device = batch.clean.input_ids.device
        keep_full = any(s.receiver_site for s in self.stages) and \
            self.used + full_bytes <= memory_budget(self.max_mb, device)
        pos = torch.stack([batch.clean.roles[r] for r in self.roles], 1)  # [B, R]
        run = _clean_run(model, batch, pos, self.sites, range(dims.n_layers), keep_full)
        ats = {s.group: _corrupt_at(batch, s) for s in self.stages}
        z = _corrupt_z(model, batch, torch.cat(list(ats.values()), 1))
        offsets, o = {}, 0
        for g, at in ats.items():
            offsets[g], o = (o, o + at.shape[1]), o + at.shape[1]
        run.update(ids=batch.clean.input_ids, corrupt_ids=batch.corrupt.input_ids, corrupt=z, offsets=offsets)
        self.forwards += 2
        self.used += full_bytes if keep_full else 0
        self.batches[batch_idx] = run
        return run

    def caches(self, model, batch: PPBatch, batch_idx: int, stage: Stage, receivers: Receivers | None,
               draws: torch.Tensor | None, keep_clean: bool) -> dict:
        """`stage_caches` of one stage read off the batch's shared runs."""
        run = self.get(model, batch, batch_idx)
        i = self.roles.index(stage.sender_role)
        a, b = run["offsets"][stage.group]
        full = run["full"]
        if keep_clean and full is None:  # the full clean run did not fit: this stage runs it again
            pos = batch.clean.roles[stage.sender_role][:, None]
            full = _clean_run(model, batch, pos, [], [], True)["full"]
            self.forwards += 1
        site = receivers.site if receivers else None
        return _assemble(model, batch.clean.roles[stage.sender_role], run["p_clean"], {j: h[:, i] for j, h in run["h_in"].items()},
                         {j: z[:, i] for j, z in run["z"].items()}, _pick_corrupt({j: z[:, a:b] for j, z in run["corrupt"].items()}, draws),
                         {j: run["site"][(site, j)][:, i] for j in (receivers.layers if receivers else [])}, receivers,
                         full if keep_clean else None)


def _assemble(model, p_s: torch.Tensor, p_clean: torch.Tensor, h_in: dict, z_clean: dict, z_corr: dict, site_all: dict,
              receivers: Receivers | None, clean_run) -> dict:
    """A stage's caches from its clean values at p_s ({layer: [B, d]} inputs, [B, H, D] z, [B, U, D] receiver
    site), its corrupt z ({layer: [B, H, D]}) and the clean run (or None)."""
    arch = LlamaFamily.of(model)
    return {
        "p_s": p_s, "p_clean": p_clean, "h_in": h_in, "z_clean": z_clean, "clean_run": clean_run, "z_corr": z_corr,
        "a_clean": {j: arch.proj(j, "o_proj")(z.flatten(-2)) for j, z in z_clean.items()},  # [B, d]
        "recv_all": site_all,  # [B, U, D]
        "recv_clean": {j: v[:, receivers.units[j]] for j, v in site_all.items()},
    }


@torch.no_grad()
def stage_caches(model, batch: PPBatch, stage: Stage, receivers: Receivers | None,
                 draws: torch.Tensor | None = None, keep_clean: bool = False) -> dict:
    """One clean and one corrupt forward for this stage alone (`StageRuns` shares them between stages); what is kept
    is at p_s (clean) or p'_s (corrupt), on device. `draws` [B, L, H] (`sender_draws`, the paper's per-sender
    entity): each head's corrupt z is read at its own entity. `keep_clean` (receiver stages): also the clean run's
    layer inputs at every position and its K/V ("clean_run"), which the receiver step reads instead of a second
    clean forward."""
    L = LlamaFamily.of(model).dims.n_layers
    p_s, _ = batch.positions(stage)
    site = receivers.site if receivers else None
    run = _clean_run(model, batch, p_s[:, None], [site] if site else [], receivers.layers if receivers else [], keep_clean)
    z_corr = _pick_corrupt(_corrupt_z(model, batch, _corrupt_at(batch, stage)), draws)
    return _assemble(model, p_s, run["p_clean"], {j: h[:, 0] for j, h in run["h_in"].items()},
                     {j: run["z"][j][:, 0] for j in range(L)}, z_corr,
                     {j: run["site"][(site, j)][:, 0] for j in (receivers.layers if receivers else [])}, receivers,
                     run["full"])


def sender_values(model, caches: dict, stage: Stage, receivers: Receivers | None, senders: list[HeadId], bb: torch.Tensor, y: torch.Tensor):
    """Step 2 (exact, position-local) for prompts `bb` and all senders."""
    pick = lambda d: {j: v[bb] for j, v in d.items()}  # noqa: E731
    return _sender_chain(LlamaFamily.of(model), stage, receivers, senders, pick(caches["h_in"]), pick(caches["z_clean"]),
                         pick(caches["z_corr"]), pick(caches["a_clean"]), pick(caches["recv_clean"]), y[bb])


@torch.no_grad()
def fast_scores(model, batch: PPBatch, stage: Stage, receivers: Receivers | None, senders: Sequence[HeadId],
                chunk_rows: int = 4096, suffix_chunk_rows: int = 512, draws: torch.Tensor | None = None,
                reuse_clean: bool = True, runs: StageRuns | None = None, batch_idx: int = 0,
                top_last_only: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """Sum over the batch of (p_patched - p_clean) / p_clean per sender: [n_layers, n_heads]; same as `naive`.

    `chunk_rows` bounds the (prompt, sender) rows of one sender-step chunk; `suffix_chunk_rows` those of one
    receiver-step forward (rows share their prompt's prefix K/V; each holds its own suffix). `runs`: the discovery's
    shared clean/corrupt forwards (`StageRuns`; None: this stage runs its own two, the reference); `batch_idx` keys
    the batch there. `reuse_clean=False` runs each receiver-step prompt's clean forward again, `top_last_only=False`
    the whole top layer at every suffix token (both the reference)."""
    arch = LlamaFamily.of(model)
    dims = arch.dims
    L, H = dims.n_layers, dims.n_heads
    clean, y = batch.clean, batch.clean.answer
    B = len(batch)
    keep = reuse_clean and receivers is not None
    before = runs.forwards if runs is not None else 0
    c = (runs.caches(model, batch, batch_idx, stage, receivers, draws, keep) if runs is not None
         else stage_caches(model, batch, stage, receivers, draws, keep_clean=keep))
    cache_forwards = runs.forwards - before if runs is not None else 2
    p_s, p_clean = c["p_s"], c["p_clean"]
    senders = sorted(senders)
    out = torch.zeros(L, H, dtype=torch.float64, device=y.device)
    blocks = cache_forwards * int(clean.attention_mask.sum()) * L
    cost = {"forwards": cache_forwards, "undefined_prompts": undefined_prompts(p_clean),
            "shared_forwards": min(2, cache_forwards) if runs is not None else 2}
    if not senders:
        return out, {**cost, "token_layer_blocks": blocks}
    S = len(senders)
    sl = torch.tensor([s.layer for s in senders], device=y.device)
    sh = torch.tensor([s.head for s in senders], device=y.device)
    per_chunk = max(1, chunk_rows // S)
    end = L if receivers is None else receivers.max_layer
    if receivers is not None:  # shallowest receiver layer above each sender layer
        rl = torch.tensor(receivers.layers, device=y.device)
        start_of = torch.tensor([int(rl[rl > layer].min()) if (rl > layer).any() else L for layer in range(L)],
                                device=y.device)
    kv_only = 0
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
                                       {j: v[loc] for j, v in res.items()}, suffix_chunk_rows, c["clean_run"],
                                       top_last_only)
                # the rows' suffix layers (plus, in the reference, one more clean forward per prompt); with
                # top_last_only the top layer's tokens before `last` run attention only (counted in kv_only)
                again = 0 if c["clean_run"] is not None else (last + 1) * L
                rows = int((start_of[sl] < L).sum()) * loc.shape[0]
                trimmed = (last - ps) * rows if top_last_only else 0
                blocks += (int((L - start_of[sl]).sum()) * (last - ps + 1) + again) * loc.shape[0] - trimmed
                kv_only += trimmed
        rel = per_clean(p - p_clean[bb, None], p_clean[bb])  # [n, S]
        out.index_put_((sl, sh), rel.double().sum(0), accumulate=True)
    return out, {**cost, "token_layer_blocks": blocks, "top_layer_attention_only_tokens": kv_only}
