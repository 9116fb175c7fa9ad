"""Attention probabilities of chosen heads, from a query role to the task's scalar roles and to every token role
(entity indices collapsed: `objects[3]` -> `objects`), as a predict loop.

The model runs with HF's eager attention (which returns the probabilities) for the loop only; every other module
keeps its attention implementation. Per prompt and head: the probability on each key role's position and on
everything else."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from etk.data.roles import PromptBatch
from etk.tasks import collapsed_index, collapsed_roles
from etk.interventions.components import HeadId
from etk.methods.base import ModelHost
from etk.models.forward import assert_eval
from etk.metrics import PerExample
from etk.models.loading import LoadedModel


@contextmanager
def eager_attention(model):
    """The model's attention switched to HF's eager implementation (returns probabilities) inside the block."""
    base = model.base_model if hasattr(model, "base_model") else model
    prev = getattr(base.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if prev is not None:
            model.set_attn_implementation(prev)


class AttentionModule(ModelHost):
    """`units`: (query role, head) pairs; `key_roles`: scalar roles of the task. After a loop, `probs()` is
    [N, U, K + 1]: per prompt and unit, the attention on each key role's position and on every other position;
    `shares()` is [N, U, R]: the attention on the tokens of each collapsed token role (`token_roles()` names them)."""

    def __init__(self, model_cfg: dict[str, Any], units: list[tuple[str, HeadId]], key_roles: list[str],
                 model: LoadedModel | None = None):
        super().__init__(model_cfg, model)
        self.units, self.key_roles = list(units), list(key_roles)
        self.seen = PerExample("probs", "shares")  # per prompt: [U, K + 1] and [U, R], gathered across processes
        self._collapse = collapsed_index()  # token role id -> its collapsed_roles() row

    @staticmethod
    def token_roles() -> tuple[str, ...]:
        return collapsed_roles()

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.seen.reset()

    @torch.no_grad()
    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        with eager_attention(self.net):
            att = self.net(**batch.model_inputs(), output_attentions=True).attentions  # L x [B, H, T, T]
        B = len(batch)
        b = torch.arange(B, device=batch.input_ids.device)
        keys = torch.stack([batch.roles[r] for r in self.key_roles], 1)  # [B, K]
        R = len(self.token_roles())
        layers = sorted({h.layer for _, h in self.units})
        stacked = torch.stack([att[j] for j in layers])  # [L', B, H, T, T] the layers with a unit
        li = torch.tensor([layers.index(h.layer) for _, h in self.units], device=keys.device)  # [U]
        hi = torch.tensor([h.head for _, h in self.units], device=keys.device)  # [U]
        q = torch.stack([batch.roles[role] for role, _ in self.units], 1)  # [B, U] query position of each unit
        rows = stacked[li[None, :], b[:, None], hi[None, :], q]  # [B, U, T]: each unit's row from its query position
        on = rows.gather(2, keys.clamp_min(0)[:, None, :].expand(-1, len(self.units), -1)) * (keys >= 0)[:, None, :]
        out = torch.cat([on, (1 - on.sum(2))[:, :, None]], 2)  # [B, U, K + 1]
        tr = batch.token_roles  # [B, T]
        col = self._collapse.to(tr.device)[tr.clamp_min(0)]  # [B, T] collapsed role of every token
        shares = torch.zeros(B, len(self.units), R, device=rows.device, dtype=rows.dtype).scatter_add(
            2, col[:, None, :].expand(-1, len(self.units), -1), rows * (tr >= 0)[:, None, :])  # [B, U, R]
        self.seen.update(batch.index, probs=out.float(), shares=shares.float())

    def shares(self) -> torch.Tensor:
        """[N, U, R] over every process's prompts, in dataset order."""
        out = self.seen.gathered("shares")[0]
        return out.cpu() if out.numel() else torch.zeros(0, len(self.units), len(self.token_roles()))

    def probs(self) -> torch.Tensor:
        """[N, U, K + 1] over every process's prompts, in dataset order."""
        out = self.seen.gathered("probs")[0]
        return out.cpu() if out.numel() else torch.zeros(0, len(self.units), len(self.key_roles) + 1)
