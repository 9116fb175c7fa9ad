"""Activation patching of head sets within one model (SPEC §5), as a predict loop: base prompts, source
activations from the pair's source prompt at the same role (the source's own position, [BUG-SRpos] fixed)."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import PairBatch
from etk.interventions.heads import HeadSet, capture
from etk.interventions.prefix import RowCache, earliest, patched_last_logits, row_logits, unpatched_rows
from etk.methods.base import ModelHost
from etk.methods.mean_ablation.module import AblationAccuracy, answer_logp
from etk.metrics import PerExample
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval
from etk.models.loading import LoadedModel

HeadSets = dict[str, HeadSet]  # configuration name -> head set


class ActivationPatchingModule(ModelHost):
    """Activation patching of head sets within one model: base prompts, source activations from the pair's source
    prompt at the same role (the source's own position, [BUG-SRpos] fixed). Rows: unpatched, then each head set."""

    def __init__(self, model_cfg: dict[str, Any], head_sets: HeadSets, cache_mb: float = 512, model: LoadedModel | None = None):
        super().__init__(model_cfg, model)
        self.head_sets: HeadSets = dict(head_sets)  # configuration name -> head set (patched rows, in order)
        self.acc = AblationAccuracy()
        self.cache = RowCache(cache_mb)  # per base prompt: unpatched logits and unpatched prefix, across repeats
        self.record = False  # keep every row's argmax token per base prompt (`predictions()`), for other targets
        self.predicted = PerExample("argmax")  # per base prompt: [1 + sets] argmax token ids, gathered

    def unpatched(self, batch: PairBatch) -> list:
        """Per base prompt: the model's own logits and its prefix K/V (`unpatched_rows`), computed once and reused
        by later repeats (whose sources differ but whose bases are the same prompts; checked token by token)."""
        base = batch.base
        T = base.input_ids.shape[1]
        same = lambda b, row: row["ids"].shape[0] == T and torch.equal(row["ids"], base.input_ids[b])  # noqa: E731
        return self.cache.get("unpatched", base.index, lambda: unpatched_rows(self.net, base), same)

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()
        self.predicted.reset()

    def predictions(self, n: int) -> torch.Tensor:
        """The argmax token of every row (unpatched, then each head set) for base prompts 0..n-1: [1 + sets, n],
        gathered from every process (-1 where a prompt was not seen)."""
        out = torch.full((1 + len(self.head_sets), n), -1, dtype=torch.long)
        index, argmax = self.predicted.gathered("index", "argmax")
        if index.numel():
            out[:, index.long().cpu()] = argmax.long().cpu().T
        return out

    def predict_step(self, batch: PairBatch, batch_idx: int) -> None:
        n_heads = LlamaFamily.of(self.net).dims.n_heads
        own = self.unpatched(batch)
        rows = [row_logits(own)]
        src = capture(self.net, batch.source, HeadSet.union(self.head_sets.values()))  # one source run for all sets
        for hs in self.head_sets.values():  # the patched runs share each base prompt's unpatched prefix
            rows.append(patched_last_logits(self.net, batch.base, hs.patches(src, batch.base, n_heads),
                                            earliest(batch.base, list(hs.roles)), rows=own))
        argmax = torch.stack([r.argmax(-1) for r in rows])  # [1 + sets, B]
        if self.record:
            self.predicted.update(batch.base.index, argmax=argmax.T)  # rows [B, 1 + sets]
        self.acc.update(argmax == batch.base.answer,
                        torch.stack([answer_logp(r, batch.base.answer) for r in rows]), batch.base.index)
