"""Partial-depth forward: run decoder layers start..L-1 on given residuals, attending to a KV cache.

Used by the suffix-only receiver step of path patching. It drives the model's own decoder layers, rotary
embedding and mask builder (no re-implemented attention); its equality with the plain forward is tested."""

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
