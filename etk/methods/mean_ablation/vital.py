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
About T/V times fewer token-layer blocks than a full forward per configuration; tested equal to the full forward."""

from __future__ import annotations

import torch

from etk.data.roles import ROLE_ID, PromptBatch
from etk.interventions.hooks import Patch, hooked
from etk.methods.mean_ablation.ablation import Ablation, ablation_patches
from etk.models.arch import LlamaFamily
from etk.models.forward import cache_kwargs, output_cache


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


@torch.no_grad()
def background(model, batch: PromptBatch, means: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values [N, kv, T, D] of every layer with every head at every position mean-ablated."""
    keep = torch.zeros(*batch.input_ids.shape, means.shape[0], means.shape[2], dtype=torch.bool,
                       device=batch.input_ids.device)
    arch = LlamaFamily.of(model)
    with hooked(model, patches=ablation_patches(means, keep)):
        cache = output_cache(arch.base.model(**batch.model_inputs(), use_cache=True))
    return [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers]


@torch.no_grad()
def vital_logits(model, batch: PromptBatch, means: torch.Tensor, ablations: list[Ablation],
                 bg: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
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
                          allowed: torch.Tensor, keep: torch.Tensor, bg, K: int) -> torch.Tensor:
    """The recomputed slots (positions P [N, V] of K configurations: hidden [K*N, V, d] embeddings, pos_ids
    [K*N, V]) through every decoder layer on the background K/V (`bg`, repeated K times), attending where
    `allowed` [K*N, 1, V, T + V] says, with each head's z kept where keep [K*N, V, L, H] says and its mean at the
    slot's position elsewhere. Returns the last layer's output [K*N, V, d] (not final-normed)."""
    arch = LlamaFamily.of(model)
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
        ~allowed, torch.finfo(hidden.dtype).min)
    patches = [Patch("z", j, means[j][P].repeat(K, 1, 1, 1), keep[:, :, j]) for j in range(arch.dims.n_layers)]
    cache = _Background(*bg, repeats=K)
    pos_emb = arch.base.model.rotary_emb(hidden, position_ids=pos_ids)
    with hooked(model, patches=patches):
        for layer in arch.layers:
            out = layer(hidden, attention_mask=mask, position_ids=pos_ids, position_embeddings=pos_emb,
                        use_cache=True, **cache_kwargs(model, cache))
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def kept_roles(ablation: Ablation) -> torch.Tensor:
    """[R] bool: the roles at which the ablation keeps any unit."""
    return ablation.keep.flatten(1).any(1)


def role_tokens(roles: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """[N, T] bool: the real tokens whose role is in `roles` [R] bool, and `last` (read out)."""
    tr = batch.token_roles
    active = roles.to(tr.device)[tr.clamp_min(0)] & (tr >= 0)  # [N, T]
    active[torch.arange(len(batch), device=tr.device), batch.roles["last"]] = True
    return active


def active_tokens(ablations: list[Ablation], batch: PromptBatch) -> torch.Tensor:
    """[N, T] bool: the tokens whose role keeps a unit in any of `ablations`, and `last` (read out). Every other
    real token is fully mean-ablated in all of them, so the background already holds its keys and values."""
    return role_tokens(torch.stack([kept_roles(a) for a in ablations]).any(0), batch)


@torch.no_grad()
def active_logits(model, batch: PromptBatch, means: torch.Tensor, ablations: list[Ablation],
                  bg: tuple[list[torch.Tensor], list[torch.Tensor]], active: torch.Tensor) -> torch.Tensor:
    """[K*N, V] logits at `last` of K ablations keeping units at any roles, recomputing only the `active` tokens
    [N, T] (`active_tokens`: every token whose role keeps a unit in one of them, and `last`) through all layers on
    the all-ablated background of the others: the vital-only path's argument, for any set of roles (the tokens
    of a role that keeps no unit depend only on themselves). Prompts have different numbers of active tokens: each
    gets V = max slots, the unused ones hidden from every query."""
    arch = LlamaFamily.of(model)
    inner = arch.base.model
    N, T = batch.input_ids.shape
    K = len(ablations)
    dev = batch.input_ids.device
    counts = active.sum(1)  # [N]
    V = int(counts.max())  # one host read per call
    t = torch.arange(T, device=dev)
    order = torch.where(active, t[None, :], T + t[None, :]).argsort(1)[:, :V]  # [N, V] active positions first
    valid = torch.arange(V, device=dev)[None, :] < counts[:, None]  # [N, V]
    last = batch.roles["last"]
    P = torch.where(valid, order, last[:, None])  # [N, V] absolute positions (unused slots: `last`, hidden)
    b = torch.arange(N, device=dev)
    hidden = inner.embed_tokens(batch.input_ids[b[:, None], P]).repeat(K, 1, 1)  # [K*N, V, d]
    pos_ids = batch.position_ids[b[:, None], P].repeat(K, 1)  # [K*N, V]
    see_bg = (t[None, None, :] <= P[:, :, None]) & ~active[:, None, :] & batch.attention_mask.bool()[:, None, :]
    see_new = (P[:, None, :] <= P[:, :, None]) & valid[:, None, :]  # [N, V queries, V keys]
    allowed = torch.cat([see_bg, see_new], 2).repeat(K, 1, 1)[:, None]  # [K*N, 1, V, T + V]
    roles = batch.token_roles[b[:, None], P].clamp_min(0)  # [N, V] role id of each slot
    table = torch.stack([a.keep for a in ablations]).to(dev)  # [K, R, L, H]
    keep = table[:, roles].flatten(0, 1)  # [K*N, V, L, H]
    hidden = _slots_through_layers(model, means, P, hidden, pos_ids, allowed, keep, bg, K)
    at_last = (P == last[:, None]) & valid  # [N, V]: the slot holding `last`
    slot = at_last.int().argmax(1).repeat(K)  # [K*N]
    return arch.lm_head(arch.final_norm(hidden[torch.arange(K * N, device=dev), slot]))
