"""Head sets: heads at position roles — the one definition every method uses (circuit groups, DCM masks, CMAP and
activation-patching sets, random baselines, path-patching receivers, mean-ablation tables) — and the one translator
from a head set to `Patch`es: replace (or interpolate) the set's z at each role's position by a source run's z.

    hs = HeadSet.from_circuit(circuit)                  # {role: heads}, VF and PT merged at `last`
    src = capture(source_model, source_batch, hs)       # {(role, layer): z [B, 1, H, D]}, one forward
    with hooked(model, patches=hs.patches(src, batch, m)):   # m None: replace; float/bool [n] or [B, n]: per head
        logits = last_logits(model, batch)
"""

from __future__ import annotations

import random
from typing import Iterable, Mapping, Sequence

import torch

from etk.data.roles import ROLE_ID, ROLE_VOCAB, PromptBatch, check_role
from etk.interventions.components import HeadId, check_heads, kv_group
from etk.interventions.hooks import Capture, Patch, hooked
from etk.interventions.prefix import unpatched_rows
from etk.models.arch import Dims
from etk.models.forward import last_logits, run_through
from etk.tasks import group_role


class HeadSet:
    """Heads at position roles: role -> heads in a fixed order (no duplicates within a role). The order is the
    index order of per-head weights (DCM masks)."""

    def __init__(self, roles: Mapping[str, Iterable[Sequence[int]]] | None = None):
        self.roles: dict[str, list[HeadId]] = {}
        for role, heads in (roles or {}).items():
            lst = self.roles.setdefault(check_role(role), [])
            for lh in heads:
                h = HeadId(int(lh[0]), int(lh[1]))
                if h not in lst:
                    lst.append(h)

    @classmethod
    def at(cls, role: str, heads: Iterable[Sequence[int]]) -> "HeadSet":
        return cls({role: heads})

    @classmethod
    def from_circuit(cls, circuit, keys: Iterable[str] | None = None) -> "HeadSet":
        """A circuit's entries (all, or `keys`: groups or roles) at their roles; groups sharing a role merge.
        `circuit` is a Circuit or a mapping {group or role: heads}."""
        groups = getattr(circuit, "groups", circuit)
        out = cls()
        for key in (groups if keys is None else keys):
            for h in groups.get(key, []):
                lst = out.roles.setdefault(group_role(key), [])
                if h not in lst:
                    lst.append(HeadId(*h))
        return out

    @classmethod
    def union(cls, sets: Iterable["HeadSet"]) -> "HeadSet":
        """One set holding every head of `sets` (one source run then serves all of them)."""
        out = cls()
        for s in sets:
            for role, heads in s.roles.items():
                lst = out.roles.setdefault(role, [])
                lst += [h for h in heads if h not in lst]
        return out

    def random_like(self, dims: Dims, rng: random.Random) -> "HeadSet":
        """As many heads at each role, drawn without replacement from all of the model's heads."""
        n = dims.n_layers * dims.n_heads
        return HeadSet({role: [(i // dims.n_heads, i % dims.n_heads) for i in rng.sample(range(n), len(heads))]
                        for role, heads in self.roles.items()})

    def heads(self, role: str) -> list[HeadId]:
        return self.roles.get(role, [])

    def units(self) -> list[tuple[str, int, int]]:
        return [(role, h.layer, h.head) for role, heads in self.roles.items() for h in heads]

    def __len__(self) -> int:
        return sum(len(h) for h in self.roles.values())

    def layers(self, role: str | None = None) -> list[int]:
        """Sorted layers holding a head (of one role, or of any)."""
        roles = [role] if role is not None else list(self.roles)
        return sorted({h.layer for r in roles for h in self.heads(r)})

    def by_layer(self, role: str) -> dict[int, list[tuple[int, int]]]:
        """layer -> [(index in the role's order, head)]."""
        out: dict[int, list[tuple[int, int]]] = {}
        for i, h in enumerate(self.heads(role)):
            out.setdefault(h.layer, []).append((i, h.head))
        return dict(sorted(out.items()))

    def kv_groups(self, role: str, dims: Dims) -> dict[int, list[int]]:
        """The KV-group view: layer -> sorted KV groups read by the role's heads (a v patch acts on a group)."""
        out: dict[int, set[int]] = {}
        for h in self.heads(role):
            out.setdefault(h.layer, set()).add(kv_group(h.head, dims))
        return {layer: sorted(g) for layer, g in sorted(out.items())}

    def check(self, dims: Dims) -> "HeadSet":
        """Raise UnknownHeadError naming the first head outside the model."""
        for heads in self.roles.values():
            check_heads(heads, dims)
        return self

    def keep(self, dims: Dims) -> torch.Tensor:
        """[R = len(ROLE_VOCAB), L, H] bool table: True at the set's (role, layer, head) units (mean ablation)."""
        t = torch.zeros(len(ROLE_VOCAB), dims.n_layers, dims.n_heads, dtype=torch.bool)
        for role, layer, head in self.check(dims).units():
            t[ROLE_ID[role], layer, head] = True
        return t

    def to_json(self) -> dict[str, list[list[int]]]:
        return {role: [list(h) for h in heads] for role, heads in self.roles.items()}

    def patches(self, src: dict[tuple[str, int], torch.Tensor], target: PromptBatch, n_heads: int,
                m: torch.Tensor | None = None) -> list[Patch]:
        """Patch the set's z at each role's position of the target prompts from `src` (see `capture`).

        m None: replace. m [n] or [B, n] (n = the set's heads, role by role in order): per-head weight of the
        target's own value — float interpolates (z <- m z + (1 - m) z_src, differentiable), bool keeps (True) or
        replaces (False). Heads outside the set are untouched."""
        B = len(target)
        dev = target.input_ids.device
        out, offset = [], 0
        if m is not None and m.dim() == 1:
            m = m[None].expand(B, -1)
        for role in self.roles:
            for j, items in self.by_layer(role).items():
                idx = torch.tensor([offset + i for i, _ in items], device=dev)
                hs = torch.tensor([h for _, h in items], device=dev)
                if m is None:
                    keep = torch.ones(B, n_heads, dtype=torch.bool, device=dev)
                    keep[:, hs] = False
                else:
                    keep = torch.ones(B, n_heads, dtype=m.dtype, device=dev).index_copy(1, hs, m[:, idx].to(m.dtype))
                out.append(Patch("z", j, src[(role, j)], keep[:, None], target.roles[role][:, None]))
            offset += len(self.heads(role))
        return out


@torch.no_grad()
def capture(model, batch: PromptBatch, hs: HeadSet, logits: bool = False, rows: bool = False):
    """z of every head at each role's own position in `batch`, for the layers the set needs:
    {(role, layer): [B, 1, H, D]}. One forward, cut after the deepest needed layer; with `logits=True` the forward
    runs to the end and the model's own last-position logits [B, V] are returned too; with `rows=True` that forward
    is `prefix.unpatched_rows` and its rows (the logits and the prefix K/V of each prompt) are returned instead."""
    need: dict[int, list[str]] = {}
    for role in hs.roles:
        for j in hs.layers(role):
            need.setdefault(j, []).append(role)
    caps = [Capture("z", j, torch.stack([batch.roles[r] for r in rs], 1)) for j, rs in need.items()]  # pos [B, R_j]
    own = None
    with hooked(model, captures=caps) as cache:
        if rows:
            own = unpatched_rows(model, batch)
        elif logits:
            own = last_logits(model, batch)
        elif need:
            run_through(model, batch, max(need))
    z = {(r, j): cache[("z", j)][:, i:i + 1] for j, rs in need.items() for i, r in enumerate(rs)}
    return (z, own) if logits or rows else z
