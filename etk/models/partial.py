"""Partial-depth forward: run decoder layers start..L-1 on given residuals, attending to a KV cache.

Used by the suffix-only receiver step of path patching. It drives the model's own decoder layers, rotary
embedding and mask builder (no re-implemented attention); its equality with the plain forward is tested."""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from etk.models.arch import LlamaFamily
from etk.models.forward import cache_kwargs


def forward_from_layer(model, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, cache) -> torch.Tensor:
    """hidden [R, Ts, d] = the residual entering layer `start` at the new positions; attention_mask [R, Tp + Ts]
    covers cached prefix + new tokens; position_ids [R, Ts]. Returns the final-normed hidden states [R, Ts, d]."""
    arch = LlamaFamily(model)
    inner = arch.base.model
    mask = create_causal_mask(config=inner.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              position_ids=position_ids, **cache_kwargs(model, cache))
    pos_emb = inner.rotary_emb(hidden, position_ids=position_ids)
    for j in range(start, arch.dims.n_layers):
        out = arch.layers[j](hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb,
                             use_cache=True, **cache_kwargs(model, cache))
        hidden = out[0] if isinstance(out, tuple) else out
    return arch.final_norm(hidden)
