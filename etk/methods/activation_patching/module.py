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
        self.unpatched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # dataset index -> (input ids, logits)
        self.reused = 0

    def unpatched_logits(self, batch: PairBatch) -> torch.Tensor:
        """[B, V] the model's own logits on the base prompts: computed once per base prompt and reused by later
        repeats (whose sources differ but whose bases are the same prompts; checked token by token)."""
        base, idx = batch.base, batch.base.index
        if idx is not None and bool((idx >= 0).all()) and all(int(i) in self.unpatched for i in idx):
            ids = [self.unpatched[int(i)] for i in idx]
            T = base.input_ids.shape[1]
            if all(len(x) == T and torch.equal(x, base.input_ids[b]) for b, (x, _) in enumerate(ids)):
                self.reused += 1
                return torch.stack([lg for _, lg in ids])
        logits = last_logits(self.net, base)
        if idx is not None and bool((idx >= 0).all()):
            for b, i in enumerate(idx.tolist()):
                self.unpatched[i] = (base.input_ids[b].clone(), logits[b].clone())
        return logits

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()

    def predict_step(self, batch: PairBatch, batch_idx: int) -> None:
        n_heads = LlamaFamily.of(self.net).dims.n_heads
        rows = [self.unpatched_logits(batch)]
        src = capture(self.net, batch.source, HeadSet.union(self.head_sets.values()))  # one source run for all sets
        for hs in self.head_sets.values():
            with hooked(self.net, patches=hs.patches(src, batch.base, n_heads)):
                rows.append(last_logits(self.net, batch.base))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.base.answer) for r in rows]),
                        torch.stack([answer_logp(r, batch.base.answer) for r in rows]), batch.base.index)
