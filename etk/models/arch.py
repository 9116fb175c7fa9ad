"""Architecture adapter: canonical accessors for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Every method reaches modules through this class, never through module-name strings, so plain, merged-LoRA and
PEFT-wrapped models are addressed the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from etk.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV group (1 without GQA)."""
        return self.n_heads // self.n_kv_heads


class LlamaFamily:
    """Accessors for a decoder-only model with `model.layers[i].self_attn.{q,k,v,o}_proj` and `mlp`."""

    def __init__(self, model: nn.Module):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model type {cfg.model_type!r} is not supported; etk supports {SUPPORTED_MODEL_TYPES}")
        self.model = model
        self.base = base
        n_heads = cfg.num_attention_heads
        self.dims = Dims(
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            d_model=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
        )

    @classmethod
    def of(cls, model: "nn.Module | LlamaFamily") -> "LlamaFamily":
        """The adapter of a model, built once and kept on the model (or the adapter itself)."""
        if isinstance(model, LlamaFamily):
            return model
        arch = model.__dict__.get("_etk_arch")
        if arch is None or arch.model is not model:
            arch = cls(model)
            model.__dict__["_etk_arch"] = arch
        return arch

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.model.layers

    def attn(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def proj(self, layer: int, name: str) -> nn.Module:
        """One of `q_proj`, `k_proj`, `v_proj`, `o_proj` of a layer."""
        return getattr(self.attn(layer), name)

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def input_norm(self, layer: int) -> nn.Module:
        """The norm before attention (its output feeds q/k/v)."""
        return self.layers[layer].input_layernorm

    def post_attn_norm(self, layer: int) -> nn.Module:
        """The norm between the attention residual add and the MLP."""
        return self.layers[layer].post_attention_layernorm

    @property
    def final_norm(self) -> nn.Module:
        return self.base.model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.base.lm_head

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (for a model accelerate split over devices, its execution device;
        offloaded parts run on the CPU)."""
        dm = getattr(self.base, "hf_device_map", None)
        if dm:
            d = dm.get("model.embed_tokens", dm.get("model", next(iter(dm.values()))))
            return torch.device("cpu" if d in ("cpu", "disk") else (f"cuda:{d}" if isinstance(d, int) else d))
        return next(self.base.parameters()).device
