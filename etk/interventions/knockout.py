"""Attention knockout (the paper's §7): block attention edges (query position -> key position) in every head of
every layer >= a start layer, by editing the attention MASK; the model's own sdpa kernel computes attention.

Mechanism. An attention function is registered in transformers' `AttentionInterface` under `etk_knockout`, and
the stock `sdpa_mask` under the same name in `AttentionMaskInterface` (without that entry transformers treats the
name as an external backend and passes NO mask, silently dropping padding). Inside `knockout(...)` the model's
attention implementation is switched to it and every attention module carries the knockout state; on exit the
previous implementation is restored and the state removed, also on exceptions.

What transformers 5.x passes (LlamaModel -> create_causal_mask -> sdpa_mask): `None` when no token is padded (sdpa
then relies on `is_causal`), else a 4-D bool mask [B, 1, T, T] (True = may attend). The knockout function turns
either into an additive float mask, adds the per-row bias (dtype min at blocked pairs, 0 elsewhere) and calls the
stock `sdpa_attention_forward`. Layers where no row is knocked out get the incoming mask untouched.

Rows. Row r of the batch blocks the pairs (query_pos[r, p], key_pos[r, p]) in layers >= start_layer[r] (pairs with
a -1 position block nothing), so one forward evaluates many (edge, start layer) configurations: rows = configs x
prompts, in the order of `etk.methods.mean_ablation.ablation.repeat_batch` (row k*N + n)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from etk.data.roles import PromptBatch
from etk.models.arch import LlamaFamily

KNOCKOUT_ATTN = "etk_knockout"  # the attention implementation name used inside `knockout(...)`
STATE_ATTR = "_etk_knockout"  # attribute carrying the KnockoutState on each attention module, only inside the block
RANDOM = "random"  # key role: a seeded random context position per example


@dataclass
class KnockoutState:
    """Per-row blocked pairs and start layers for one `knockout(...)` block."""

    query_pos: torch.Tensor  # [R, P] long absolute query positions (-1 = no pair)
    key_pos: torch.Tensor  # [R, P] long absolute key positions (-1 = no pair)
    start_layer: torch.Tensor  # [R] long: pairs are blocked in layers >= start_layer[r]
    active: tuple[bool, ...]  # per layer: whether any row blocks a pair there (decided once, no device sync later)
    _pairs: dict = field(default_factory=dict)  # (q_len, kv_len, device) -> [R, q_len, kv_len] bool

    def pair_mask(self, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """[R, q_len, kv_len] bool: the row's blocked (query, key) pairs, in any layer. Queries are the last
        q_len of the kv_len positions (the whole sequence without a cache)."""
        key = (q_len, kv_len, str(device))
        if key not in self._pairs:
            R = self.query_pos.shape[0]
            q = self.query_pos.to(device) - (kv_len - q_len)  # [R, P] query index within the query window
            k = self.key_pos.to(device)  # [R, P]
            ok = (q >= 0) & (q < q_len) & (k >= 0) & (k < kv_len)  # [R, P]
            r = torch.arange(R, device=device)[:, None].expand_as(q)  # [R, P]
            hits = torch.zeros(R, q_len, kv_len, device=device)
            hits.index_put_((r, q.clamp(0, q_len - 1), k.clamp(0, kv_len - 1)), ok.float(), accumulate=True)
            self._pairs[key] = hits > 0
        return self._pairs[key]

    def blocked(self, layer: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """[R, 1, q_len, kv_len] bool: pairs blocked in this layer (rows whose start layer is <= layer)."""
        on = self.start_layer.to(device) <= layer  # [R]
        return (self.pair_mask(q_len, kv_len, device) & on[:, None, None])[:, None]


def knockout_mask(attention_mask: torch.Tensor | None, blocked: torch.Tensor, query: torch.Tensor,
                  key: torch.Tensor) -> torch.Tensor:
    """The incoming mask (None = plain causal, 4-D bool, or 4-D additive float) plus the knockout bias, as an
    additive float mask [R, 1, q_len, kv_len] in the query's dtype. Values saturate at the dtype's min (never -inf,
    so a fully masked row stays finite)."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    neg = torch.finfo(query.dtype).min
    if attention_mask is None:  # sdpa's is_causal path: materialise the causal mask (no padding in this case)
        q_abs = torch.arange(q_len, device=query.device) + (kv_len - q_len)  # [q]
        allowed = torch.arange(kv_len, device=query.device)[None, :] <= q_abs[:, None]  # [q, kv]
        attention_mask = allowed[None, None]  # [1, 1, q, kv]
    if attention_mask.dtype == torch.bool:
        base = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attention_mask, neg)
    else:
        base = attention_mask.to(query.dtype)
    bias = torch.zeros(blocked.shape, dtype=query.dtype, device=query.device).masked_fill(blocked, neg)
    return (base + bias).clamp_min(neg)  # [R, 1, q, kv]


def knockout_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """The registered attention function: stock sdpa on the knockout-edited mask (query [R, H, q, D], key/value
    [R, KV, kv, D], mask None or [R, 1, q, kv])."""
    state: KnockoutState | None = getattr(module, STATE_ATTR, None)
    if state is not None and state.active[module.layer_idx]:
        blocked = state.blocked(module.layer_idx, query.shape[-2], key.shape[-2], query.device)
        attention_mask = knockout_mask(attention_mask, blocked, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KNOCKOUT_ATTN, knockout_attention)
AttentionMaskInterface.register(KNOCKOUT_ATTN, sdpa_mask)  # so the padding mask is built and passed as under sdpa


@contextmanager
def knockout(model, query_pos: torch.Tensor, key_pos: torch.Tensor,
             start_layer: torch.Tensor) -> Iterator[KnockoutState]:
    """Block attention from query_pos to key_pos ([R] or [R, P] long, -1 = none) in every head of layers
    >= start_layer ([R] long; >= n_layers = no knockout) for the forwards run inside the block (batch of R rows,
    no KV cache). Always restores the model's attention implementation and removes the state."""
    if query_pos.dim() == 1:
        query_pos, key_pos = query_pos[:, None], key_pos[:, None]
    if query_pos.shape != key_pos.shape or start_layer.shape != query_pos.shape[:1]:
        raise ValueError(f"knockout needs query_pos/key_pos [R, P] and start_layer [R]; got "
                         f"{tuple(query_pos.shape)}, {tuple(key_pos.shape)}, {tuple(start_layer.shape)}")
    arch = LlamaFamily.of(model)
    L = arch.dims.n_layers
    start_layer = start_layer.long()
    has_pair = ((query_pos >= 0) & (key_pos >= 0)).any(1)  # [R]
    first = int(torch.where(has_pair, start_layer, L).min().item()) if len(start_layer) else L
    state = KnockoutState(query_pos.long(), key_pos.long(), start_layer,
                          active=tuple(j >= first for j in range(L)))
    modules = [arch.attn(j) for j in range(L)]
    previous = [getattr(m, STATE_ATTR, None) for m in modules]  # non-None only when nested
    prev_impl = arch.base.config._attn_implementation
    try:
        for m in modules:
            setattr(m, STATE_ATTR, state)
        arch.base.set_attn_implementation(KNOCKOUT_ATTN)
        yield state
    finally:
        arch.base.set_attn_implementation(prev_impl)
        for m, p in zip(modules, previous):
            if p is None:
                if hasattr(m, STATE_ATTR):
                    delattr(m, STATE_ATTR)
            else:
                setattr(m, STATE_ATTR, p)


# --- building rows ---------------------------------------------------------------------------------------------


def parse_edge(edge: str, scalar_roles: Sequence[str] | None = None) -> tuple[str, str]:
    """'query_role->key_role' -> (query_role, key_role); roles are scalar roles (of `scalar_roles`, default: of any
    registered task), keys may also be `random`."""
    if scalar_roles is None:
        from etk.tasks import TASKS

        scalar_roles = tuple(dict.fromkeys(r for t in TASKS.values() for r in t.scalar_roles))
    q, sep, k = edge.partition("->")
    q, k = q.strip(), k.strip()
    if not sep or q not in scalar_roles or k not in (*scalar_roles, RANDOM):
        raise ValueError(f"bad knockout edge {edge!r}: expected '<{'|'.join(scalar_roles)}>-><"
                         f"{'|'.join((*scalar_roles, RANDOM))}>'")
    return q, k


def random_context_positions(batch: PromptBatch, generator: torch.Generator | None,
                             u: torch.Tensor | None = None) -> torch.Tensor:
    """[B] long: per example, a uniformly drawn real-token position among 0..last-3: from the uniforms `u` [B] in
    [0, 1) when given (e.g. drawn per dataset index), else one draw per example, in batch order, from `generator`
    (a CPU generator)."""
    T = batch.input_ids.shape[1]
    pos = torch.arange(T, device=batch.input_ids.device)
    ok = (pos[None, :] <= batch.roles["last"][:, None] - 3) & batch.attention_mask.bool()  # [B, T]
    n_ok = ok.sum(1)  # [B]
    if bool((n_ok == 0).any()):
        raise ValueError("a prompt has no real token at positions 0..last-3 to draw a random key from")
    u = (torch.rand(len(batch), generator=generator) if u is None else u).to(n_ok.device)  # [B]
    k = torch.minimum((u * n_ok).long(), n_ok - 1)  # [B] rank of the drawn position among the allowed ones
    return (ok.cumsum(1) > k[:, None]).int().argmax(1)  # [B] first position whose allowed-count exceeds k


def edge_positions(batch: PromptBatch, edge: str, random_pos: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """([B] query positions, [B] key positions) of an edge; undefined roles stay -1 (block nothing)."""
    q_role, k_role = parse_edge(edge)
    if k_role == RANDOM:
        if random_pos is None:
            raise ValueError(f"edge {edge!r} needs random_pos (random_context_positions)")
        k = random_pos
    else:
        k = batch.roles[k_role]
    return batch.roles[q_role], k


def config_rows(query_pos: torch.Tensor, key_pos: torch.Tensor,
                start_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K configurations over N prompts -> rows k*N + n: query_pos, key_pos [K, N] (or [K, N, P]) and start_layer
    [K] -> ([K*N, P], [K*N, P], [K*N])."""
    if query_pos.dim() == 2:
        query_pos, key_pos = query_pos[..., None], key_pos[..., None]
    K, N = query_pos.shape[:2]
    return query_pos.flatten(0, 1), key_pos.flatten(0, 1), start_layer.long().repeat_interleave(N)
