"""Components: head ids and the four head-level sites, one definition shared by every method.

Sites (GQA explicit): `z` = per-query-head attention output, the input of `o_proj`; `q` = per-query-head output of
`q_proj` (before RoPE); `k`, `v` = per-KV-group outputs of `k_proj` / `v_proj`. Query head h reads KV group
h // (n_heads / n_kv_heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

from etk.errors import EtkError
from etk.models.arch import Dims


class HeadId(NamedTuple):
    """A query head (or, for k/v sites, a KV group) of one layer."""

    layer: int
    head: int


@dataclass(frozen=True)
class SiteSpec:
    module: str  # attribute of self_attn
    hook: str  # "input" (forward pre-hook) or "output" (forward hook)
    per_group: bool  # indexed by KV group instead of query head


SITES: dict[str, SiteSpec] = {
    "z": SiteSpec("o_proj", "input", False),
    "q": SiteSpec("q_proj", "output", False),
    "k": SiteSpec("k_proj", "output", True),
    "v": SiteSpec("v_proj", "output", True),
}


class UnknownHeadError(EtkError, ValueError):
    """A head id outside the model."""


def site_spec(site: str) -> SiteSpec:
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites are {sorted(SITES)}")
    return SITES[site]


def n_units(dims: Dims, site: str) -> int:
    """Heads (z, q) or KV groups (k, v) per layer."""
    return dims.n_kv_heads if site_spec(site).per_group else dims.n_heads


def kv_group(head: int, dims: Dims) -> int:
    """The KV group a query head reads."""
    return head // dims.group_size


def check_heads(heads: Iterable[tuple[int, int]], dims: Dims, site: str = "z") -> list[HeadId]:
    """Validate head ids against the model; raise naming the first unknown one."""
    out = []
    n = n_units(dims, site)
    for lh in heads:
        layer, head = int(lh[0]), int(lh[1])
        if not (0 <= layer < dims.n_layers and 0 <= head < n):
            raise UnknownHeadError(
                f"unknown head ({layer}, {head}) for site {site!r}: the model has {dims.n_layers} layers x {n} "
                f"{'KV groups' if site_spec(site).per_group else 'heads'}"
            )
        out.append(HeadId(layer, head))
    return out


def all_heads(dims: Dims) -> list[HeadId]:
    return [HeadId(layer, h) for layer in range(dims.n_layers) for h in range(dims.n_heads)]
