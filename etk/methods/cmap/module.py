"""CMAP (cross-model activation patching, SPEC §6) as a predict loop: the target model runs the prompts with
chosen heads' z at their groups' roles replaced by the source model's z on the SAME prompt (only the needed
positions of the source run are kept)."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import PromptBatch
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet, capture
from etk.interventions.prefix import earliest, patched_last_logits, row_logits, unpatched_rows
from etk.methods.base import PairHost
from etk.methods.mean_ablation.module import AblationAccuracy, answer_logp
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval
from etk.models.pair import PairModels

HeadSets = dict[str, HeadSet]  # configuration name -> head set


class CMAPModule(PairHost):
    """Two frozen models; per batch, the target model alone and with each head set patched from the source model.
    A LoRA pair runs on one copy of the base weights, toggling the adapter (see `load_pair`)."""

    def __init__(self, base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], head_sets: HeadSets,
                 direction: str = "forward", toggle_adapter: bool = True, pair: PairModels | None = None):
        super().__init__(base_cfg, finetuned_cfg, toggle_adapter, pair)
        if direction not in ("forward", "reverse"):
            raise ConfigError(f"direction must be 'forward' (fine-tuned -> base) or 'reverse', got {direction!r}")
        self.head_sets: HeadSets = dict(head_sets)  # configuration name -> head set (patched rows, in order)
        self.acc = AblationAccuracy()

    @property
    def source_target(self) -> tuple[str, str]:
        return ("finetuned", "base") if self.hparams.direction == "forward" else ("base", "finetuned")

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.base_net)
        assert_eval(self.ft_net)
        self.acc.reset()

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        source, target = self.source_target
        with self.pair.use(source) as model:
            # one source forward serves every head set (and gives the source model's own prediction)
            src, source_logits = capture(model, batch, HeadSet.union(self.head_sets.values()), logits=True)
        with self.pair.use(target) as model:
            n_heads = LlamaFamily.of(model).dims.n_heads
            own = unpatched_rows(model, batch)  # the target alone, and its prefix K/V for the patched runs
            rows = [source_logits, row_logits(own)]  # the two models alone
            for hs in self.head_sets.values():
                rows.append(patched_last_logits(model, batch, hs.patches(src, batch, n_heads),
                                                earliest(batch, list(hs.roles)), rows=own))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.answer) for r in rows]),
                        torch.stack([answer_logp(r, batch.answer) for r in rows]), batch.index)
