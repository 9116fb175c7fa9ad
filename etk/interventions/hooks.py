"""The one intervention primitive: read or overwrite per-head activations at per-example positions, vectorised.

A `Patch` on (site, layer) sets, at positions `pos` [B, R] (or every position when `pos` is None):

    x[b, pos[b, r], h] <- keep[b, r, h] ? x : source        (bool keep: replace)
    x[b, pos[b, r], h] <- m * x + (1 - m) * source          (float keep m: interpolate, differentiable in m)

Replacement, interpolation, mean ablation, DCM masks and cross-model patching are all this one operation with
different `source` and `keep`. z edits run in a forward pre-hook on `o_proj` (the real, possibly adapted, o_proj
then runs on the edited input); q/k/v edits in a forward hook on the projection. Hooks live only inside
`hooked(...)`, which always removes them."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from etk.interventions.components import n_units, site_spec
from etk.models.arch import LlamaFamily


@dataclass
class Patch:
    site: str  # z | q | k | v
    layer: int
    source: torch.Tensor  # [B, R, U, D] (or broadcastable, e.g. [1, T, U, D] means per absolute position)
    keep: torch.Tensor  # [B, R, U] bool (True keeps the current value) or float weight m of the current value
    pos: torch.Tensor | None = None  # [B, R] long absolute positions; None = all T positions (R = T)


@dataclass
class Capture:
    site: str
    layer: int
    pos: torch.Tensor | None = None  # [B, R] long; None = all positions
    detach: bool = True


def _apply(x: torch.Tensor, patches: Sequence[Patch]) -> torch.Tensor:
    """x: [B, T, U, D] -> edited copy (no Python loop over examples, heads or positions)."""
    x = x.clone()
    dev = x.device  # the module's device: with a model split over devices, sources and masks follow the activation
    for p in patches:
        pos = None if p.pos is None else p.pos.to(dev)
        if pos is None:
            cur = x
        else:
            b = torch.arange(x.shape[0], device=dev)[:, None]  # [B, 1]
            cur = x[b, pos]  # [B, R, U, D]
        src = p.source.to(device=dev, dtype=x.dtype)
        keep = p.keep.to(dev)
        if keep.dtype == torch.bool:
            new = torch.where(keep[..., None], cur, src)
        else:
            m = keep[..., None].to(x.dtype)
            new = m * cur + (1 - m) * src
        if pos is None:
            x = new  # same shape as x by broadcasting against cur = x
        else:
            x[b, pos] = new
    return x


def _take(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if pos is None:
        return x
    b = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[b, pos.to(x.device)]


@contextmanager
def hooked(
    model, patches: Sequence[Patch] = (), captures: Sequence[Capture] = ()
) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Install patches and captures for the forwards run inside the block; yields {(site, layer): [B, R, U, D]}.

    Captures record the value the model computed at the site, before any patch at that site is applied."""
    arch = LlamaFamily.of(model)
    dims = arch.dims
    by_site: dict[tuple[str, int], list[Patch]] = defaultdict(list)
    for p in patches:
        by_site[(p.site, p.layer)].append(p)
    caps: dict[tuple[str, int], list[Capture]] = defaultdict(list)
    for c in captures:
        caps[(c.site, c.layer)].append(c)
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def make(key: tuple[str, int]):
        site, layer = key
        units = n_units(dims, site)
        plist, clist = by_site.get(key, []), caps.get(key, [])

        def edit(flat: torch.Tensor) -> torch.Tensor:
            x = flat.unflatten(-1, (units, dims.head_dim))  # [B, T, U, D]
            for c in clist:
                v = _take(x, c.pos)
                store[key] = v.detach() if c.detach else v
            if not plist:
                return flat
            return _apply(x, plist).flatten(-2)

        if site_spec(site).hook == "input":
            def pre_hook(module, args, kwargs):
                return (edit(args[0]),) + tuple(args[1:]), kwargs
            return pre_hook
        def fwd_hook(module, args, output):
            return edit(output)
        return fwd_hook

    try:
        for key in set(by_site) | set(caps):
            site, layer = key
            if not 0 <= layer < dims.n_layers:
                raise ValueError(f"layer {layer} out of range (model has {dims.n_layers})")
            spec = site_spec(site)
            mod = arch.proj(layer, spec.module)
            if spec.hook == "input":
                handles.append(mod.register_forward_pre_hook(make(key), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(make(key)))
        yield store
    finally:
        for h in handles:
            h.remove()
