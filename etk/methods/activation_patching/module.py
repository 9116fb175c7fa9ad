"""Activation patching of head sets within one model (SPEC §5), as a predict loop: base prompts, source
activations from the pair's source prompt at the same role (the source's own position, [BUG-SRpos] fixed)."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import PairBatch
from etk.interventions.heads import HeadSet, capture
from etk.interventions.prefix import RowCache, earliest, patched_last_logits, per_row_split, row_logits, unpatched_rows
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

    def __init__(self, model_cfg: dict[str, Any], head_sets: HeadSets, cache_mb: float | str = "auto",
                 model: LoadedModel | None = None, repeats: int = 1, reference: bool = False):
        super().__init__(model_cfg, model)
        self.reference = bool(reference)  # True: every patched row split at the batch's earliest patched position
        self.head_sets: HeadSets = dict(head_sets)  # configuration name -> head set (patched rows, in order)
        # one accuracy per repeat: a predict loop over a list of loaders (one per repeat) fills accs[dataloader_idx]
        self.accs = torch.nn.ModuleList([AblationAccuracy() for _ in range(max(1, int(repeats)))])
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

    @property
    def acc(self) -> AblationAccuracy:
        """The first repeat's accuracy (the only one of a one-loader loop)."""
        return self.accs[0]

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        for acc in self.accs:
            acc.reset()
        self.predicted.reset()

    def predictions(self, n: int) -> torch.Tensor:
        """The argmax token of every row (unpatched, then each head set) for base prompts 0..n-1: [1 + sets, n],
        gathered from every process (-1 where a prompt was not seen)."""
        out = torch.full((1 + len(self.head_sets), n), -1, dtype=torch.long)
        index, argmax = self.predicted.gathered("index", "argmax")
        if index.numel():
            out[:, index.long().cpu()] = argmax.long().cpu().T
        return out

    def predict_step(self, batch: PairBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        n_heads = LlamaFamily.of(self.net).dims.n_heads
        own = self.unpatched(batch)
        rows = [row_logits(own)]
        src = capture(self.net, batch.source, HeadSet.union(self.head_sets.values()))  # one source run for all sets
        split = patched_last_logits if self.reference else per_row_split  # where each row's patch starts, or the batch's first
        for hs in self.head_sets.values():  # the patched runs share each base prompt's unpatched prefix
            rows.append(split(self.net, batch.base, hs.patches(src, batch.base, n_heads),
                              earliest(batch.base, list(hs.roles)), rows=own))
        argmax = torch.stack([r.argmax(-1) for r in rows])  # [1 + sets, B]
        if self.record:
            self.predicted.update(batch.base.index, argmax=argmax.T)  # rows [B, 1 + sets]
        self.accs[dataloader_idx].update(argmax == batch.base.answer,
                        torch.stack([answer_logp(r, batch.base.answer) for r in rows]), batch.base.index)
