"""Patch a set of heads' z at a role from a source run into a base run: the operation shared by DCM (with a
differentiable mask), activation patching (binary) and CMAP (source = another model)."""

from __future__ import annotations

from typing import Sequence

import torch

from etk.data.roles import PromptBatch
from etk.interventions.components import HeadId
from etk.interventions.hooks import Capture, Patch, hooked
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits, run_through


class HeadSet:
    """Heads of a group (in a fixed order) and, per layer, their indices into that order."""

    def __init__(self, heads: Sequence[HeadId]):
        self.heads = [HeadId(int(a), int(b)) for a, b in heads]
        self.layers = sorted({h.layer for h in self.heads})
        self.by_layer = {j: [(i, h.head) for i, h in enumerate(self.heads) if h.layer == j] for j in self.layers}

    def __len__(self) -> int:
        return len(self.heads)


@torch.no_grad()
def source_z(model, source: PromptBatch, role: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """z of every head at the source's own `role` position, for the given layers: {layer: [B, 1, H, D]}.
    The forward stops after the last of those layers."""
    pos = source.roles[role][:, None]
    with hooked(model, captures=[Capture("z", j, pos) for j in layers]) as cache:
        run_through(model, source, max(layers))
    return {j: cache[("z", j)] for j in layers}


def head_patches(heads: HeadSet, m: torch.Tensor, src: dict[int, torch.Tensor], pos: torch.Tensor, n_heads: int) -> list[Patch]:
    """z <- m * z_base + (1 - m) * z_source for the set's heads at `pos` [B]; other heads untouched.
    m: [n] float (differentiable) or [B, n] per-row; bool m means keep (True) / patch (False)."""
    out = []
    B = pos.shape[0]
    m2 = m if m.dim() == 2 else m[None].expand(B, -1)  # [B, n]
    for j in heads.layers:
        idx = torch.tensor([i for i, _ in heads.by_layer[j]], device=pos.device)
        hs = torch.tensor([h for _, h in heads.by_layer[j]], device=pos.device)
        fill = torch.ones(B, n_heads, dtype=m2.dtype, device=pos.device)
        if m2.dtype == torch.bool:
            keep = fill.index_copy(1, hs, m2[:, idx])
        else:
            keep = fill.index_copy(1, hs, m2[:, idx].to(fill.dtype))
        out.append(Patch("z", j, src[j], keep[:, None], pos[:, None]))
    return out


def patched_last_logits(model, base: PromptBatch, heads: HeadSet, m: torch.Tensor, src: dict[int, torch.Tensor],
                        role: str) -> torch.Tensor:
    """[B, V] logits of the base prompts with the heads' z at `role` mixed with the source values."""
    n_heads = LlamaFamily(model).dims.n_heads
    with hooked(model, patches=head_patches(heads, m, src, base.roles[role], n_heads)):
        return last_logits(model, base)
