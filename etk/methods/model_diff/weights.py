"""Weight deltas between the members of a pair, per head (W_Q, W_O), per KV group (W_K, W_V) and per MLP: relative
Frobenius norms ||W_ft - W_base|| / ||W_base||. For a LoRA pair run on one copy of the base weights (the adapter
toggled), the delta is the adapter's own (scaling * B @ A, peft's `get_delta_weight`), never merged."""

from __future__ import annotations

import torch

from etk.models.arch import LlamaFamily

MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


def weight_and_delta(base_mod: torch.nn.Module, ft_mod: torch.nn.Module, toggled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_base [out, in], delta [out, in]) of one linear layer in fp32. `toggled`: `ft_mod` is a peft LoRA layer
    (the same module serves both members); its delta is the sum of its active adapters' delta weights."""
    if not toggled:
        w = base_mod.weight.detach().float()
        return w, ft_mod.weight.detach().float() - w
    w = getattr(ft_mod, "base_layer", ft_mod).weight.detach().float()
    delta = torch.zeros_like(w)
    for name in getattr(ft_mod, "active_adapters", []) or []:
        if name in getattr(ft_mod, "lora_A", {}):
            delta += ft_mod.get_delta_weight(name).detach().float()
    return w, delta


def _rel(delta_sq: torch.Tensor, base_sq: torch.Tensor) -> torch.Tensor:
    """sqrt(sum delta^2) / sqrt(sum W^2), 0 where the base weights are all zero and nothing changed."""
    return torch.where(base_sq > 0, delta_sq.sqrt() / base_sq.clamp_min(1e-30).sqrt(),
                       torch.where(delta_sq > 0, torch.full_like(delta_sq, float("inf")), torch.zeros_like(delta_sq)))


@torch.no_grad()
def weight_deltas(base, finetuned, toggled: bool = False) -> dict[str, torch.Tensor]:
    """Relative weight change of every component: `q`, `o` [layer, head]; `k`, `v` [layer, kv_group]; `mlp`
    [layer]; `head` [layer, head] over the head's own W_Q and W_O rows/columns and its KV group's W_K, W_V."""
    a, b = LlamaFamily.of(base), LlamaFamily.of(finetuned)
    d = a.dims
    H, KV, D, L = d.n_heads, d.n_kv_heads, d.head_dim, d.n_layers
    sq: dict[str, list] = {k: [] for k in ("q", "k", "v", "o", "mlp")}
    for j in range(L):
        for name, groups in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
            w, dw = weight_and_delta(a.proj(j, name), b.proj(j, name), toggled)
            sq[name[0]].append(((dw.view(groups, D, -1) ** 2).sum((1, 2)), (w.view(groups, D, -1) ** 2).sum((1, 2))))
        w, dw = weight_and_delta(a.proj(j, "o_proj"), b.proj(j, "o_proj"), toggled)  # [d, H*D]: columns per head
        sq["o"].append(((dw.view(-1, H, D) ** 2).sum((0, 2)), (w.view(-1, H, D) ** 2).sum((0, 2))))
        ds = bs = torch.zeros(())
        for name in MLP_PROJS:
            w, dw = weight_and_delta(getattr(a.mlp(j), name), getattr(b.mlp(j), name), toggled)
            ds, bs = ds + (dw ** 2).sum(), bs + (w ** 2).sum()
        sq["mlp"].append((ds, bs))
    stacked = {k: (torch.stack([x for x, _ in v]), torch.stack([y for _, y in v])) for k, v in sq.items()}
    out = {k: _rel(*v) for k, v in stacked.items()}
    group = torch.arange(H) // (H // KV)  # the KV group of every query head
    num = stacked["q"][0] + stacked["o"][0] + stacked["k"][0][:, group] + stacked["v"][0][:, group]
    den = stacked["q"][1] + stacked["o"][1] + stacked["k"][1][:, group] + stacked["v"][1][:, group]
    out["head"] = _rel(num, den)
    return out
