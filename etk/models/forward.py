"""Forward passes used by every method: logits at the `last` role only (no [B, T, V] logits tensor)."""

from __future__ import annotations

import torch

from etk.data.roles import PromptBatch
from etk.models.arch import LlamaFamily


def last_logits(model, batch: PromptBatch) -> torch.Tensor:
    """[B, V] logits at each example's `last` position."""
    arch = LlamaFamily.of(model)
    hidden = arch.base.model(**batch.model_inputs(), use_cache=False).last_hidden_state  # [B, T, d]
    b = torch.arange(hidden.shape[0], device=hidden.device)
    return arch.lm_head(hidden[b, batch.roles["last"]])  # [B, V]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass whose remaining layers nothing reads."""


def run_through(model, batch: PromptBatch, last_layer: int) -> None:
    """Run the decoder on `batch` through layer `last_layer` only, for the hooks the caller installed; the layers
    after it (and the LM head) are skipped, since no capture there is wanted."""
    arch = LlamaFamily.of(model)

    def stop(module, args, output):
        raise _StopForward

    handle = arch.layers[last_layer].register_forward_hook(stop)
    try:
        arch.base.model(**batch.model_inputs(), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()


def cache_kwargs(model, cache) -> dict:
    """The KV-cache argument under its name in the installed transformers (`cache` since 5.x, was
    `past_key_values`)."""
    import inspect

    params = inspect.signature(LlamaFamily.of(model).base.model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def output_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def assert_eval(model) -> None:
    """Measurements are only valid in eval mode (dropout off)."""
    if model.training:
        raise RuntimeError("model is in train mode; call model.eval() before measuring")
