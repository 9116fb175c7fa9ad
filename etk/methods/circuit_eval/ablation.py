"""Position-wise mean ablation (SPEC §3.1) as batched configurations.

An `Ablation` says which heads are kept at each vital position role (`last`, `query_label`, `prev_query_label`)
and whether every head at every other position is mean-ablated. K ablations x N prompts run as one batch of
K*N rows, with one vectorised z patch per layer: z[row, t, h] <- keep ? z : mean[t, h]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from etk.circuits import GROUP_ROLE, Circuit
from etk.data.roles import PromptBatch
from etk.interventions.components import check_heads
from etk.interventions.hooks import Patch
from etk.models.arch import Dims

VITAL_ROLES: tuple[str, ...] = ("last", "query_label", "prev_query_label")


@dataclass
class Ablation:
    keep: torch.Tensor  # [3 roles, L, H] bool: heads kept at each vital role
    ablate_non_vital: bool  # mean-ablate every head at every other position
    name: str = ""

    def without(self, items: Iterable[tuple[str, int, int]], name: str = "") -> "Ablation":
        """A copy with (role, layer, head) items also ablated."""
        keep = self.keep.clone()
        for role, layer, head in items:
            keep[VITAL_ROLES.index(role), layer, head] = False
        return Ablation(keep, self.ablate_non_vital, name)


def full_model(dims: Dims) -> Ablation:
    """No ablation at all (the identity patch)."""
    return Ablation(torch.ones(3, dims.n_layers, dims.n_heads, dtype=torch.bool), False, "model")


def circuit_ablation(circuit: Circuit, dims: Dims, ablate_non_vital: bool = True, name: str = "circuit") -> Ablation:
    """Keep the circuit's heads at their groups' roles; mean-ablate everything else."""
    keep = torch.zeros(3, dims.n_layers, dims.n_heads, dtype=torch.bool)
    for group, heads in circuit.groups.items():
        for layer, head in check_heads(heads, dims):
            keep[VITAL_ROLES.index(GROUP_ROLE[group]), layer, head] = True
    return Ablation(keep, ablate_non_vital, name)


def circuit_items(circuit: Circuit) -> list[tuple[str, int, int]]:
    """The circuit's (role, layer, head) items without duplicates (VF and PT share `last`)."""
    out: list[tuple[str, int, int]] = []
    for group, heads in circuit.groups.items():
        for layer, head in heads:
            it = (GROUP_ROLE[group], int(layer), int(head))
            if it not in out:
                out.append(it)
    return out


def keep_rows(ablations: Sequence[Ablation], batch: PromptBatch) -> torch.Tensor:
    """[K*N, T, L, H] bool keep mask for K ablations over N prompts (row k*N + n)."""
    K, N, T = len(ablations), len(batch), batch.input_ids.shape[1]
    dev = batch.input_ids.device
    cfg = torch.stack([a.keep for a in ablations]).to(dev)  # [K, 3, L, H]
    nv = torch.tensor([not a.ablate_non_vital for a in ablations], device=dev)  # [K]
    L, H = cfg.shape[-2:]
    keep = nv[:, None, None, None, None].expand(K, N, T, L, H).clone()  # [K, N, T, L, H]
    k = torch.arange(K, device=dev)[:, None]
    n = torch.arange(N, device=dev)[None, :]
    for i, role in enumerate(VITAL_ROLES):
        pos = batch.roles[role]  # [N]
        if (pos < 0).any():
            raise ValueError(f"role {role!r} undefined for some prompts; mean ablation needs answerable prompts")
        keep[k, n, pos[None, :].expand(K, N)] = cfg[:, i][:, None].expand(K, N, L, H)
    return keep.flatten(0, 1)


def repeat_batch(batch: PromptBatch, K: int) -> PromptBatch:
    rep = lambda t: t.repeat(K, *([1] * (t.dim() - 1)))  # noqa: E731
    return PromptBatch(rep(batch.input_ids), rep(batch.attention_mask), rep(batch.position_ids),
                       {k: rep(v) for k, v in batch.roles.items()}, rep(batch.answer))


def ablation_patches(means: torch.Tensor, keep: torch.Tensor) -> list[Patch]:
    """One full-sequence z patch per layer; means [L, T_m, H, D], keep [R, T, L, H]."""
    T = keep.shape[1]
    if T > means.shape[1]:
        raise ValueError(f"prompts have {T} positions but the means cover {means.shape[1]}: compute the means on "
                         "prompts of the same shape (same n_boxes and template)")
    return [Patch("z", j, means[j, :T][None], keep[:, :, j]) for j in range(means.shape[0])]
