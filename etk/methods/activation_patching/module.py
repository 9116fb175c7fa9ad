"""Activation patching of head sets within one model (SPEC §5), as a predict loop: base prompts, source
activations from the pair's source prompt at the same role (the source's own position, [BUG-SRpos] fixed)."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import PairBatch
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import hooked
from etk.methods.base import ModelHost
from etk.methods.circuit_eval.module import AblationAccuracy, answer_logp
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits

HeadSets = dict[str, HeadSet]  # configuration name -> head set


class ActivationPatchingModule(ModelHost):
    """Activation patching of head sets within one model: base prompts, source activations from the pair's source
    prompt at the same role (the source's own position, [BUG-SRpos] fixed). Rows: unpatched, then each head set."""

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)
        self.head_sets: HeadSets = {}
        self.acc = AblationAccuracy()

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()

    def predict_step(self, batch: PairBatch, batch_idx: int) -> None:
        n_heads = LlamaFamily.of(self.net).dims.n_heads
        rows = [last_logits(self.net, batch.base)]
        src = capture(self.net, batch.source, HeadSet.union(self.head_sets.values()))  # one source run for all sets
        for hs in self.head_sets.values():
            with hooked(self.net, patches=hs.patches(src, batch.base, n_heads)):
                rows.append(last_logits(self.net, batch.base))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.base.answer) for r in rows]),
                        torch.stack([answer_logp(r, batch.base.answer) for r in rows]), batch.base.index)
