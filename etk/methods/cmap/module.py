"""CMAP (cross-model activation patching, SPEC §6) as a predict loop: the target model runs the prompts with
chosen heads' z at their groups' roles replaced by the source model's z on the SAME prompt (only the needed
positions of the source run are kept)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from etk.data.roles import MEMBERS, PromptBatch
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet, capture
from etk.interventions.prefix import earliest, patched_last_logits, row_logits, unpatched_rows
from etk.methods.base import PairHost
from etk.methods.mean_ablation.module import AblationAccuracy, answer_logp
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval
from etk.models.pair import PairModels

HeadSets = dict[str, HeadSet]  # configuration name -> head set


@dataclass(frozen=True)
class CMAPJob:
    """One CMAP run: its direction and the head sets patched, one by one."""

    direction: str  # forward: fine-tuned -> base; reverse: base -> fine-tuned
    head_sets: HeadSets

    @property
    def source_target(self) -> tuple[str, str]:
        return ("finetuned", "base") if self.direction == "forward" else ("base", "finetuned")


class CMAPModule(PairHost):
    """Two frozen models; per batch, for each job (`CMAPJob`), the target model alone and with each head set patched
    from the source model. Each member runs once per batch for all jobs: one forward gives its z at the roles the
    jobs patch from it, its own logits and its prefix K/V as a target (the forward direction's source run is the
    reverse direction's target run); `reference=True` runs source and target forwards per job (the same numbers).
    A LoRA pair runs on one copy of the base weights, toggling the adapter (see `load_pair`)."""

    def __init__(self, base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], jobs: Sequence[CMAPJob],
                 toggle_adapter: bool = True, pair: PairModels | None = None, reference: bool = False):
        super().__init__(base_cfg, finetuned_cfg, toggle_adapter, pair)
        self.jobs = list(jobs)
        for job in self.jobs:
            if job.direction not in ("forward", "reverse"):
                raise ConfigError(f"direction must be 'forward' (fine-tuned -> base) or 'reverse', got {job.direction!r}")
        self.reference = reference
        self.accs = [AblationAccuracy() for _ in self.jobs]  # per job: [2 + n_sets] rows per prompt

    @property
    def acc(self) -> AblationAccuracy:
        """The first job's accuracies (the only job of a plain run)."""
        return self.accs[0]

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.base_net)
        assert_eval(self.ft_net)
        for acc in self.accs:
            acc.reset()

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        rows = self._reference_rows(batch) if self.reference else self._shared_rows(batch)
        for acc, r in zip(self.accs, rows):
            acc.update(torch.stack([(x.argmax(-1) == batch.answer) for x in r]),
                       torch.stack([answer_logp(x, batch.answer) for x in r]), batch.index)

    def _shared_rows(self, batch: PromptBatch) -> list[list[torch.Tensor]]:
        """Each member's one forward (captures at the roles patched from it, its logits, its prefix rows), then
        each job's patched runs on its target's rows: per job [source alone, target alone, each set] [B, V]."""
        z, logits, rows = {}, {}, {}
        for member in MEMBERS:
            need = [hs for job in self.jobs if job.source_target[0] == member for hs in job.head_sets.values()]
            target = any(job.source_target[1] == member for job in self.jobs)
            if not need and not target:
                continue
            with self.pair.use(member) as model:
                z[member], own = capture(model, batch, HeadSet.union(need), logits=not target, rows=target)
            logits[member] = row_logits(own) if target else own
            rows[member] = own if target else None
        out = []
        for job in self.jobs:
            source, target = job.source_target
            with self.pair.use(target) as model:
                out.append([logits[source], logits[target]] + self._patched(model, batch, job, z[source], rows[target]))
        return out

    def _reference_rows(self, batch: PromptBatch) -> list[list[torch.Tensor]]:
        """The reference: per job, one source forward (captures and its logits) and one target forward."""
        out = []
        for job in self.jobs:
            source, target = job.source_target
            with self.pair.use(source) as model:
                src, source_logits = capture(model, batch, HeadSet.union(job.head_sets.values()), logits=True)
            with self.pair.use(target) as model:
                own = unpatched_rows(model, batch)  # the target alone, and its prefix K/V for the patched runs
                out.append([source_logits, row_logits(own)] + self._patched(model, batch, job, src, own))
        return out

    @staticmethod
    def _patched(model, batch: PromptBatch, job: CMAPJob, src: dict, own: list) -> list[torch.Tensor]:
        """[B, V] logits of the target (`model`, its rows `own`) with each head set's z from the source (`src`)."""
        n_heads = LlamaFamily.of(model).dims.n_heads
        return [patched_last_logits(model, batch, hs.patches(src, batch, n_heads), earliest(batch, list(hs.roles)),
                                    rows=own) for hs in job.head_sets.values()]
