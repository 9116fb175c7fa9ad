"""Position-wise mean ablation (SPEC §3.1) as batched configurations over (position role, head) units.

An `Ablation` says, for every token role of the prompt (`etk.data.roles.ROLE_VOCAB`: the task's partition of a
prompt's tokens, e.g. `last`, `query_label`, `objects[k]`, the template's other tokens), which heads keep their own
z there; every other (role, head) unit is replaced by its mean over the ablation prompts at the same absolute
position. A task's group circuits keep heads at its vital roles only (the positions its groups act at: the paper's
three for entity tracking) and (with `ablate_non_vital`) ablate every head at every other position; a
position-aware circuit keeps units at any role. K ablations x N prompts run as one batch of K*N rows, with one
vectorised z patch per layer: z[row, t, h] <- keep[role(t), h] ? z : mean[t, h]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from etk.circuits import Circuit
from etk.data.roles import ROLE_ID, ROLE_VOCAB, PromptBatch
from etk.interventions.heads import HeadSet
from etk.interventions.hooks import Patch
from etk.models.arch import Dims

Unit = tuple[str, int, int]  # (position role, layer, head)


@dataclass
class Ablation:
    keep: torch.Tensor  # [R = len(ROLE_VOCAB), L, H] bool: head h's z is kept at the tokens of role r
    name: str = ""
    vital: tuple[str, ...] = ()  # the task's vital roles (`last` first): an ablation keeping nothing elsewhere
    #                              takes the exact vital-only path; () = never

    def without(self, items: Iterable[Unit], name: str = "") -> "Ablation":
        """A copy with (role, layer, head) units also ablated."""
        return self._set(items, False, name)

    def plus(self, items: Iterable[Unit], name: str = "") -> "Ablation":
        """A copy with (role, layer, head) units also kept."""
        return self._set(items, True, name)

    def _set(self, items: Iterable[Unit], value: bool, name: str) -> "Ablation":
        keep = self.keep.clone()
        for role, layer, head in items:
            keep[ROLE_ID[role], layer, head] = value
        return Ablation(keep, name, self.vital)

    def head_set(self, partial_only: bool = False) -> HeadSet:
        """The kept (role, head) units as a head set; `partial_only` leaves out roles where every head is kept."""
        n = self.keep.shape[1] * self.keep.shape[2]
        return HeadSet({ROLE_VOCAB[r]: (self.keep[r].nonzero().tolist()) for r in range(self.keep.shape[0])
                        if 0 < int(self.keep[r].sum()) and not (partial_only and int(self.keep[r].sum()) == n)})

    def heads_per_role(self) -> dict[str, int]:
        """Kept heads per role, for the roles where any head is kept."""
        counts = self.keep.flatten(1).sum(1).tolist()
        return {ROLE_VOCAB[r]: int(c) for r, c in enumerate(counts) if c}

    def kept_roles(self) -> set[str]:
        return set(self.heads_per_role())


def empty_keep(dims: Dims) -> torch.Tensor:
    """[R, L, H] all False: every unit mean-ablated."""
    return torch.zeros(len(ROLE_VOCAB), dims.n_layers, dims.n_heads, dtype=torch.bool)


def full_model(dims: Dims) -> Ablation:
    """No ablation at all (the identity patch)."""
    return Ablation(~empty_keep(dims), "model")


def vital_roles(circuit: Circuit | None = None, vital: Sequence[str] | None = None) -> tuple[str, ...]:
    """`vital` when given, else the vital roles of the task whose groups key `circuit`, else the default task's."""
    from etk.tasks import task_of, task_with_groups

    if vital is not None:
        return tuple(vital)
    task = task_with_groups(circuit.groups) if circuit is not None else None
    return (task or task_of(None)).vital_roles


def _base(dims: Dims, vital: Iterable[str], ablate_non_vital: bool) -> torch.Tensor:
    """Every head ablated at the vital roles; the other roles ablated or kept."""
    keep = empty_keep(dims) if ablate_non_vital else ~empty_keep(dims)
    keep[[ROLE_ID[r] for r in vital]] = False
    return keep


def circuit_ablation(circuit: Circuit, dims: Dims, ablate_non_vital: bool = True, name: str = "circuit",
                     vital: Sequence[str] | None = None) -> Ablation:
    """Keep the circuit's heads at their roles; ablate every other head at the vital roles (the task's: `vital`, or
    those of the circuit's task, plus every role the circuit names) and, with `ablate_non_vital`, every head at every
    other position."""
    vital = vital_roles(circuit, vital)
    keep = _base(dims, set(vital) | set(circuit.roles()), ablate_non_vital)
    return Ablation(keep | circuit.head_set().keep(dims), name, vital)


def all_heads_ablation(dims: Dims, ablate_non_vital: bool = True, vital: Sequence[str] | None = None) -> Ablation:
    """The best any circuit of the task's vital positions can do: every head kept at the vital roles (`vital`, else
    the default task's), everything else as in `circuit_ablation` (so with ablate_non_vital=False it is the
    identity)."""
    vital = vital_roles(None, vital)
    keep = _base(dims, vital, ablate_non_vital)
    keep[[ROLE_ID[r] for r in vital]] = True
    return Ablation(keep, "all_heads", vital)


def keep_rows(ablations: Sequence[Ablation], batch: PromptBatch) -> torch.Tensor:
    """[K*N, T, L, H] bool keep mask for K ablations over N prompts (row k*N + n); padding is never edited."""
    dev = batch.input_ids.device
    for role in dict.fromkeys(r for a in ablations for r in a.vital):
        if (batch.roles[role] < 0).any():
            raise ValueError(f"role {role!r} undefined for some prompts; mean ablation needs answerable prompts")
    table = torch.stack([a.keep for a in ablations]).to(dev)  # [K, R, L, H]
    tr = batch.token_roles  # [N, T]
    keep = table[:, tr.clamp_min(0)]  # [K, N, T, L, H]
    keep |= (tr < 0)[None, :, :, None, None]
    return keep.flatten(0, 1)


def repeat_batch(batch: PromptBatch, K: int) -> PromptBatch:
    return batch.repeat(K)


def ablation_patches(means: torch.Tensor, keep: torch.Tensor) -> list[Patch]:
    """One full-sequence z patch per layer; means [L, T_m, H, D], keep [R, T, L, H]."""
    T = keep.shape[1]
    if T > means.shape[1]:
        raise ValueError(f"prompts have {T} positions but the means cover {means.shape[1]}: compute the means on "
                         "prompts of the same shape (the same task settings: e.g. n_boxes and template)")
    return [Patch("z", j, means[j, :T][None], keep[:, :, j]) for j in range(means.shape[0])]
