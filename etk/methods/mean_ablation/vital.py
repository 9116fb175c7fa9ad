"""Exact fast path for mean ablations that keep heads only at the task's vital roles (every other position fully
mean-ablated; entity tracking: the paper's three): faithfulness, random circuits, minimality, curves and
completeness's F(C \\ K).

Why it is exact. At a position where every head is replaced by its mean, the attention output is a constant
(o_proj of the means), so that position's residual stream depends only on its own token and index, never on the
other tokens or on which heads the configuration keeps elsewhere. Its keys and values are therefore the same in
every such configuration: one "background" forward (everything ablated) per prompt batch gives them. Each
configuration then only recomputes its V vital tokens through all layers, attending to the background keys and
values of the other positions and to its own vital keys/values, with the model's own decoder layers (a KV cache
object supplies the background; a 4-D mask keeps causality and hides the background's vital and padded entries).
About T/V times fewer token-layer blocks than a full forward per configuration; tested equal to the full forward.

The same argument per layer gives the active-token path for ablations keeping units at any roles (circuit search):
a token whose heads are all mean-ablated below layer j has the background's residual entering j, so it is
recomputed only from its role's first kept layer on (`active_logits`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from etk.data.roles import ROLE_ID, PromptBatch
from etk.interventions.hooks import Patch, hooked
from etk.interventions.prefix import patched_last_logits, row_logits
from etk.methods.mean_ablation.ablation import Ablation, ablation_patches
from etk.models.arch import LlamaFamily
from etk.models.forward import cache_kwargs, output_cache
from etk.models.partial import LayerInputs, top_layer_at


def vital_only(ablation: Ablation) -> bool:
    """True when the ablation names its vital roles and keeps no head outside them (so the fast path applies)."""
    if not ablation.vital:
        return False
    others = torch.ones(ablation.keep.shape[0], dtype=torch.bool)
    others[[ROLE_ID[r] for r in ablation.vital]] = False
    return not bool(ablation.keep[others].any())


class _Background:
    """A duck-typed KV cache: layer j's update returns the background keys/values (repeated once per
    configuration) followed by the configuration's own vital keys/values."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], repeats: int):
        self.keys, self.values, self.repeats = keys, values, repeats  # [N, kv, T, D] per layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rep = lambda t: t.repeat(self.repeats, 1, 1, 1)  # noqa: E731
        return (torch.cat([rep(self.keys[layer_idx]), key_states], 2),
                torch.cat([rep(self.values[layer_idx]), value_states], 2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2]


@dataclass
class BackgroundRun:
    """The all-ablated forward of a prompt batch: keys and values [N, kv, T, D] and layer inputs [N, T, d] of every
    layer (inputs[j] = the residual entering layer j; inputs[0] the embeddings)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    inputs: list[torch.Tensor]


@torch.no_grad()
def background(model, batch: PromptBatch, means: torch.Tensor) -> BackgroundRun:
    """Every head at every position mean-ablated: keys, values and layer inputs of every layer."""
    keep = torch.zeros(*batch.input_ids.shape, means.shape[0], means.shape[2], dtype=torch.bool,
                       device=batch.input_ids.device)
    arch = LlamaFamily.of(model)
    with LayerInputs(arch, None) as inputs, hooked(model, patches=ablation_patches(means, keep)):
        cache = output_cache(arch.base.model(**batch.model_inputs(), use_cache=True))
    return BackgroundRun([lay.keys for lay in cache.layers], [lay.values for lay in cache.layers],
                         [inputs[j] for j in range(arch.dims.n_layers)])


@torch.no_grad()
def vital_logits(model, batch: PromptBatch, means: torch.Tensor, ablations: list[Ablation],
                 bg: BackgroundRun) -> torch.Tensor:
    """[K*N, V] logits at `last` of K vital-only ablations over the N prompts (row k*N + n), from the background.
    The ablations share their vital roles (`last` first)."""
    vital = ablations[0].vital
    if any(a.vital != vital for a in ablations) or not vital or vital[0] != "last":
        raise ValueError("vital-only ablations of one call need the same vital roles, `last` first")
    arch = LlamaFamily.of(model)
    inner = arch.base.model
    N, T = batch.input_ids.shape
    K = len(ablations)
    dev = batch.input_ids.device
    b = torch.arange(N, device=dev)
    P = torch.stack([batch.roles[r] for r in vital], 1)  # [N, V] absolute positions
    hidden = inner.embed_tokens(batch.input_ids[b[:, None], P]).repeat(K, 1, 1)  # [K*N, V, d]
    pos_ids = batch.position_ids[b[:, None], P].repeat(K, 1)  # [K*N, V]
    t = torch.arange(T, device=dev)
    is_vital = (t[None, None, :] == P[:, :, None]).any(1)  # [N, T]
    see_bg = (t[None, None, :] <= P[:, :, None]) & ~is_vital[:, None, :] & batch.attention_mask.bool()[:, None, :]
    see_new = P[:, None, :] <= P[:, :, None]  # [N, V queries, V keys]
    allowed = torch.cat([see_bg, see_new], 2).repeat(K, 1, 1)[:, None]  # [K*N, 1, V, T + V]
    table = torch.stack([a.keep for a in ablations]).to(dev)[:, [ROLE_ID[r] for r in vital]]  # [K, V, L, H]
    keep = table[:, None].expand(K, N, *table.shape[1:]).flatten(0, 1)  # [K*N, V, L, H]
    hidden = _slots_through_layers(model, means, P, hidden, pos_ids, allowed, keep, bg, K)
    return arch.lm_head(arch.final_norm(hidden[:, 0]))  # vital[0] is `last`


def _slots_through_layers(model, means: torch.Tensor, P: torch.Tensor, hidden: torch.Tensor, pos_ids: torch.Tensor,
                          allowed: torch.Tensor, keep: torch.Tensor, bg: BackgroundRun, K: int) -> torch.Tensor:
    """The recomputed slots (positions P [N, V] of K configurations: hidden [K*N, V, d] embeddings, pos_ids
    [K*N, V]) through every decoder layer on the background K/V (`bg`, repeated K times), attending where
    `allowed` [K*N, 1, V, T + V] says, with each head's z kept where keep [K*N, V, L, H] says and its mean at the
    slot's position elsewhere. Returns the last layer's output [K*N, V, d] (not final-normed)."""
    arch = LlamaFamily.of(model)
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
        ~allowed, torch.finfo(hidden.dtype).min)
    patches = [Patch("z", j, means[j][P].repeat(K, 1, 1, 1), keep[:, :, j]) for j in range(arch.dims.n_layers)]
    cache = _Background(bg.keys, bg.values, repeats=K)
    pos_emb = arch.base.model.rotary_emb(hidden, position_ids=pos_ids)
    with hooked(model, patches=patches):
        for layer in arch.layers:
            out = layer(hidden, attention_mask=mask, position_ids=pos_ids, position_embeddings=pos_emb,
                        use_cache=True, **cache_kwargs(model, cache))
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def start_layers(ablations: Sequence[Ablation], batch: PromptBatch, n_layers: int) -> torch.Tensor:
    """[K, N, T] the first layer at which each token keeps a head in each ablation (n_layers: none, or padding);
    `last` (read out) at most n_layers - 1. Below it the token's every head is mean-ablated, so its residual is the
    background's: it depends on nothing but itself."""
    dev = batch.input_ids.device
    kept = torch.stack([a.keep for a in ablations]).to(dev).any(-1)  # [K, R, L]
    first = torch.where(kept.any(-1), kept.int().argmax(-1), n_layers)  # [K, R]
    tr = batch.token_roles
    st = first[:, tr.clamp_min(0)].masked_fill((tr < 0)[None], n_layers)  # [K, N, T]
    b = torch.arange(len(batch), device=dev)
    st[:, b, batch.roles["last"]] = st[:, b, batch.roles["last"]].clamp_max(n_layers - 1)
    return st


def staggered_blocks(st: torch.Tensor, n_layers: int) -> torch.Tensor:
    """[K] the (token, layer) blocks `active_logits` runs for each ablation on its own (start layers st [K, N, T],
    padded to the batch's most active prompt at each layer), to compare with a full forward's N * T * n_layers."""
    layers = torch.arange(n_layers, device=st.device)
    per_layer = (st[..., None] <= layers).sum(2).amax(1)  # [K, L] slots of the widest prompt at each layer
    return per_layer.sum(1) * st.shape[1]


@torch.no_grad()
def active_logits(model, batch: PromptBatch, means: torch.Tensor, ablations: list[Ablation],
                  bg: BackgroundRun) -> torch.Tensor:
    """[K*N, V] logits at `last` of K ablations keeping units at any roles and layers: each token is recomputed only
    from its start layer (`start_layers`: its role's first kept layer) on, on the all-ablated background (`bg`),
    the vital-only path's argument per token and layer: below its start a token's residual is the background's
    (it enters there from `bg.inputs`), and so are its keys and values, which the recomputed tokens read from `bg`.
    At the top layer only `last` goes through the MLP. Rows (k, n) hold their tokens sorted by start layer, so the
    tokens running at layer j are a prefix of each row; rows are padded to the widest, the padding hidden."""
    arch = LlamaFamily.of(model)
    L = arch.dims.n_layers
    N, T = batch.input_ids.shape
    K = len(ablations)
    dev = batch.input_ids.device
    st = start_layers(ablations, batch, L).flatten(0, 1)  # [K*N, T]
    t = torch.arange(T, device=dev)
    order = (st * T + t).argsort(1)  # [K*N, T] tokens by start layer, then position
    widths = (st[..., None] <= torch.arange(L, device=dev)).sum(1).amax(0).tolist()  # [L] slots run at each layer (one read)
    V = max(widths)
    P = order[:, :V]  # [K*N, V] absolute positions
    slot_st = st.gather(1, P)  # [K*N, V]
    n_of = torch.arange(N, device=dev).repeat(K)  # [K*N] the row's prompt
    real = batch.attention_mask.bool()[n_of]  # [K*N, T]
    pos_ids = batch.position_ids[n_of[:, None], P]  # [K*N, V]
    cos, sin = arch.base.model.rotary_emb(bg.inputs[0], position_ids=pos_ids)  # [K*N, V, D]
    roles = batch.token_roles[n_of[:, None], P].clamp_min(0)  # [K*N, V]
    table = torch.stack([a.keep for a in ablations]).to(dev)  # [K, R, L, H]
    keep = table[torch.arange(K, device=dev).repeat_interleave(N)[:, None], roles]  # [K*N, V, L, H]
    before = P[:, None, :] <= P[:, :, None]  # [K*N, V queries, V keys]: causal among the slots
    cache = _Background(bg.keys, bg.values, repeats=K)
    hidden = torch.zeros(K * N, V, arch.dims.d_model, dtype=bg.inputs[0].dtype, device=dev)
    last_slot = (P == batch.roles["last"][n_of][:, None]).int().argmax(1)  # [K*N]
    rows = torch.arange(K * N, device=dev)
    for j in range(L):
        w = widths[j]
        if w == 0:
            continue
        Pj, stj = P[:, :w], slot_st[:, :w]
        hidden[:, :w] = torch.where((stj == j)[..., None], bg.inputs[j][n_of[:, None], Pj], hidden[:, :w])
        on = stj <= j  # [K*N, w] the slots running at layer j (the others pad the row)
        own = torch.zeros(K * N, T, dtype=torch.bool, device=dev).scatter_(1, Pj, on)  # [K*N, T]
        see_bg = (t[None, None, :] <= Pj[:, :, None]) & (real & ~own)[:, None, :]  # [K*N, w, T]
        see_new = before[:, :w, :w] & on[:, None, :]
        mask = torch.zeros(K * N, 1, w, T + w, dtype=hidden.dtype, device=dev).masked_fill(
            ~torch.cat([see_bg, see_new], 2)[:, None], torch.finfo(hidden.dtype).min)
        layer, emb = arch.layers[j], (cos[:, :w], sin[:, :w])
        with hooked(model, patches=[Patch("z", j, means[j][Pj], keep[:, :w, j])]):  # [K*N, w, H, D], [K*N, w, H]
            if j < L - 1:
                out = layer(hidden[:, :w], attention_mask=mask, position_ids=pos_ids[:, :w], position_embeddings=emb,
                            use_cache=True, **cache_kwargs(model, cache))
                hidden[:, :w] = out[0] if isinstance(out, tuple) else out
            else:  # the top layer: attention everywhere (for `last`'s keys), the MLP at `last` only
                hidden[rows, last_slot] = top_layer_at(arch, hidden[:, :w], last_slot, attention_mask=mask,
                                                       position_ids=pos_ids[:, :w], position_embeddings=emb,
                                                       **cache_kwargs(model, cache))
    return arch.lm_head(arch.final_norm(hidden[rows, last_slot]))


def first_ablated(ablations: Sequence[Ablation], batch: PromptBatch) -> torch.Tensor:
    """[K, N] the first real position whose role has an ablated unit, in each ablation and prompt (T: none). Every
    token before it keeps all its heads, and so do all tokens it attends to: it runs exactly as in the plain forward."""
    dev = batch.input_ids.device
    N, T = batch.input_ids.shape
    ablated = ~torch.stack([a.keep for a in ablations]).to(dev).flatten(2).all(2)  # [K, R]
    tr = batch.token_roles
    hit = ablated[:, tr.clamp_min(0)] & (tr >= 0)[None]  # [K, N, T]
    t = torch.arange(T, device=dev)
    return torch.where(hit, t, T).amin(2)


@torch.no_grad()
def prefix_logits(model, batch: PromptBatch, means: torch.Tensor, ablations: list[Ablation], clean: list,
                  split: torch.Tensor) -> torch.Tensor:
    """[K*N, V] logits at `last` of K ablations whose ablated units all lie at or after split [K, N] (`first_ablated`)
    in each prompt: the plain forward's prefix K/V (`clean`: `unpatched_rows` of the batch, which also give the
    logits of rows with nothing ablated before `last`) and a mean-ablated forward of the suffix only, one per distinct
    split position (`patched_last_logits`)."""
    dev = batch.input_ids.device
    N, T = batch.input_ids.shape
    K = len(ablations)
    L = means.shape[0]
    flat = split.flatten()  # [K*N], row k*N + n
    out = row_logits(clean).repeat(K, 1)  # [K*N, V]: rows with nothing ablated up to `last`
    last = batch.roles["last"].repeat(K)
    table = torch.stack([a.keep for a in ablations]).to(dev)  # [K, R, L, H]
    rows = batch.repeat(K)
    for s in flat[flat <= last].unique().tolist():  # one host read
        r = ((flat == s) & (flat <= last)).nonzero()[:, 0]
        n = r % N
        sub = rows.rows(r)
        pos = torch.arange(s, T, device=dev)[None].expand(r.shape[0], -1)  # [n, T - s]
        tr = batch.token_roles[n][:, s:]  # [n, T - s]
        keep = table[(r // N)[:, None], tr.clamp_min(0)] | (tr < 0)[..., None, None]  # [n, T - s, L, H]; pads kept
        patches = [Patch("z", j, means[j, s:T][None].expand(r.shape[0], -1, -1, -1), keep[:, :, j], pos)
                   for j in range(L)]
        out[r] = patched_last_logits(model, sub, patches, torch.full_like(r, s), rows=[clean[i] for i in n.tolist()])
    return out
