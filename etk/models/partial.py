"""Partial-depth forwards on the model's own decoder layers, rotary embedding and mask builder: `forward_from_layer`
(layers start..L-1 on given residuals, attending to a KV cache; used by knockout), `top_layer_at` (the top layer
read at one token per row) and `SharedPrefix` (many rows attending to one prompt's prefix K/V in place; path
patching's receiver step). All three are tested against the plain forward."""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from etk.models.arch import LlamaFamily
from etk.models.forward import cache_kwargs


class LayerInputs:
    """Capture decoder layers' input hidden states with forward pre-hooks: at per-example positions pos [B] ->
    [B, d] or pos [B, R] -> [B, R, d]; pos None -> every position [B, T, d]. Only `layers` (default: all)."""

    def __init__(self, arch: LlamaFamily, pos: torch.Tensor | None, layers=None):
        self.arch, self.pos, self.values, self.handles = arch, pos, {}, []
        self.layers = range(arch.dims.n_layers) if layers is None else list(layers)

    def __enter__(self):
        b = None
        if self.pos is not None:
            b = torch.arange(self.pos.shape[0], device=self.pos.device)
            if self.pos.dim() == 2:
                b = b[:, None]
        for j in self.layers:
            def hook(mod, args, kwargs, j=j):
                h = args[0] if args else kwargs["hidden_states"]
                self.values[j] = h if b is None else h[b, self.pos]
            self.handles.append(self.arch.layers[j].register_forward_pre_hook(hook, with_kwargs=True))
        return self.values

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def forward_from_layer(model, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, cache) -> torch.Tensor:
    """hidden [R, Ts, d] = the residual entering layer `start` at the new positions; attention_mask [R, Tp + Ts]
    covers cached prefix + new tokens; position_ids [R, Ts]. Returns the final-normed hidden states [R, Ts, d]."""
    arch = LlamaFamily.of(model)
    inner = arch.base.model
    mask = create_causal_mask(config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              position_ids=position_ids, **cache_kwargs(model, cache))
    pos_emb = inner.rotary_emb(hidden, position_ids=position_ids)
    for j in range(start, arch.dims.n_layers):
        out = arch.layers[j](hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb,
                             use_cache=True, **cache_kwargs(model, cache))
        hidden = out[0] if isinstance(out, tuple) else out
    return arch.final_norm(hidden)


def top_layer_at(arch: LlamaFamily, x: torch.Tensor, at: torch.Tensor, **attention) -> torch.Tensor:
    """The top decoder layer where only one token per row is read: x [N, T, d] its input, at [N] that token's
    index. Attention runs at every token (its keys and values are the others'; `attention`: the layer's mask,
    position ids and embeddings, cache), the MLP at `at` only: the decoder layer's operations in its order (pre-norm
    residual blocks). Returns [N, d]."""
    layer = arch.layers[arch.dims.n_layers - 1]
    a, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **attention)
    rows = torch.arange(x.shape[0], device=x.device)
    r = x[rows, at] + a[rows, at]  # [N, d]
    return r + layer.mlp(layer.post_attention_layernorm(r))


SHARED_PREFIX = "etk_shared_prefix"
_ACTIVE: list["SharedPrefix"] = []


class SharedPrefix:
    """Attention for many rows that share one prompt's prefix: inside `with SharedPrefix(...)`, the model's
    attention layers (their own projections, norms and rotary embedding) attend from the N = n * k rows' new
    tokens [N, Ts] to (a) their prompt's cached prefix K/V [n, kv_heads, P, D], read in place for every row of that
    prompt (no per-row copy), and (b) the rows' own new tokens, causally. Rows are prompt-major: rows i*k..(i+1)*k-1
    belong to prompt i. The same softmax over P + Ts keys as a full forward, computed in two blocks.

    keys/values: {layer: [n, kv_heads, P, D]}; valid: [n, P] bool (False = padding in the prefix)."""

    def __init__(self, model, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], valid: torch.Tensor):
        self.config = LlamaFamily.of(model).base.config
        self.keys, self.values = keys, values
        self.bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))

    def __enter__(self):
        from transformers import AttentionInterface

        AttentionInterface.register(SHARED_PREFIX, _shared_prefix_attention)
        self.saved = self.config._attn_implementation_internal
        self.config._attn_implementation_internal = SHARED_PREFIX
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.pop()
        self.config._attn_implementation_internal = self.saved


def _shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                             scaling: float, dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    """query [N, H, Ts, D], key/value [N, G, Ts, D] (the new tokens, RoPE applied) -> ([N, Ts, H, D], None)."""
    ctx = _ACTIVE[-1]
    pk, pv = ctx.keys[module.layer_idx], ctx.values[module.layer_idx]  # [n, G, P, D]
    n, G, P, D = pk.shape
    N, H, Ts, _ = query.shape
    k, g = N // n, H // G
    dev = query.device
    q = query.reshape(n, k, G, g * Ts, D).transpose(1, 2).reshape(n, G, k * g * Ts, D)
    s_pre = (q @ pk.transpose(-1, -2)).view(n, G, k, g, Ts, P).permute(0, 2, 1, 3, 4, 5) * scaling  # [n, k, G, g, Ts, P]
    s_new = (query.reshape(N, G, g * Ts, D) @ key.transpose(-1, -2)).view(n, k, G, g, Ts, Ts) * scaling
    i = torch.arange(Ts, device=dev)
    new_bias = torch.zeros(Ts, Ts, dtype=torch.float32, device=dev).masked_fill(i[None, :] > i[:, None], float("-inf"))
    pre_bias = ctx.bias[:, None, None, None, None, :].expand(n, 1, 1, 1, Ts, P)
    if sliding_window is not None:  # key index kv visible from query index qi iff qi - kv < window
        qi = P + i
        pre_bias = pre_bias.masked_fill((qi[:, None] - torch.arange(P, device=dev)[None, :]) >= sliding_window, float("-inf"))
        new_bias = new_bias.masked_fill((i[:, None] - i[None, :]) >= sliding_window, float("-inf"))
    acc = torch.promote_types(query.dtype, torch.float32)  # softmax in at least fp32, as the eager kernel
    scores = torch.cat([s_pre.to(acc) + pre_bias, s_new.to(acc) + new_bias], -1)  # [n, k, G, g, Ts, P + Ts]
    w = torch.softmax(scores, -1).to(query.dtype)
    w_pre = w[..., :P].permute(0, 2, 1, 3, 4, 5).reshape(n, G, k * g * Ts, P)
    out = (w_pre @ pv).view(n, G, k, g, Ts, D).transpose(1, 2).reshape(N, H, Ts, D)
    out = out + (w[..., P:].reshape(N, G, g * Ts, Ts) @ value).view(N, H, Ts, D)
    return out.transpose(1, 2).contiguous(), None
