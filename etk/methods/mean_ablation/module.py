"""Circuit evaluation as Lightning predict loops: per-position means, then many ablations per forward."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from etk.data.roles import PromptBatch
from etk.interventions.hooks import Capture, hooked
from etk.methods.base import ModelHost
from etk.methods.mean_ablation.ablation import Ablation, ablation_patches, keep_rows
from etk.interventions.prefix import unpatched_rows
from etk.methods.mean_ablation.vital import (
    active_logits,
    background,
    first_ablated,
    prefix_logits,
    staggered_blocks,
    start_layers,
    vital_logits,
    vital_only,
)
from etk.metrics import ExampleMetric, all_sum
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits
from etk.models.loading import LoadedModel


class AblationAccuracy(ExampleMetric):
    """Per-example correctness of K configurations (state [N, K]) and the answer's log-probability, gathered from
    every process in dataset order; compute() -> [K] accuracies."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("logp", default=[], dist_reduce_fx="cat")

    def update(self, correct: torch.Tensor, logp: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        """correct [K, B] bool, logp [K, B] float (NaN when not measured)."""
        self.correct.append(correct.T.float())
        self.logp.append(logp.T.float() if logp is not None else torch.full_like(correct.T, float("nan"), dtype=torch.float))
        self._add_index(index, correct.shape[1], correct.device)

    def per_example(self) -> torch.Tensor:
        """[K, N] correctness."""
        c = self.gathered("correct")[0]
        return c.T if c.numel() else torch.zeros(0, 0)

    def per_example_logp(self) -> torch.Tensor:
        """[K, N] log-probability of the answer."""
        lp = self.gathered("logp")[0]
        return lp.T if lp.numel() else torch.zeros(0, 0)

    def compute(self) -> torch.Tensor:
        return self.per_example().mean(1)


def answer_logp(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """[B] log-probability of each row's answer token (logits [B, V])."""
    return logits.float().log_softmax(-1).gather(1, answer.clamp_min(0)[:, None])[:, 0]


class MeansModule(ModelHost):
    """Per-position z means over the ablation prompts (SPEC §3.1), pads excluded: one predict loop, then `means()`."""

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self._sum, self._count = None, None

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        dims = LlamaFamily.of(self.net).dims
        with hooked(self.net, captures=[Capture("z", j) for j in range(dims.n_layers)]) as cache:
            LlamaFamily.of(self.net).base.model(**batch.model_inputs(), use_cache=False)
        z = torch.stack([cache[("z", j)] for j in range(dims.n_layers)])  # [L, B, T, H, D]
        m = batch.attention_mask.to(z.dtype)[None, :, :, None, None]
        s, c = (z * m).sum(1).double(), batch.attention_mask.sum(0)
        if self._sum is None:
            self._sum, self._count = s, c
        else:
            if s.shape[1] != self._sum.shape[1]:
                raise ValueError("ablation prompts of different lengths: use one n_boxes/template per ablation set")
            self._sum, self._count = self._sum + s, self._count + c

    def means(self) -> torch.Tensor:
        """[L, T, H, D] per-position means (pads excluded), over every process's ablation prompts."""
        total, count = all_sum(self._sum), all_sum(self._count)
        return (total / count.clamp_min(1)[None, :, None, None]).float().cpu()


ACTIVE_SHARE = 0.8  # an exact shortcut (active-token or clean-prefix path) for an ablation whose (token, layer) blocks
#                     on it are at most this share of a full forward's


class AblationEval(ModelHost):
    """Accuracy of ablations (`Ablation`s: which (role, head) units keep their z; the others take `means`) on every
    prompt. The ablations are the module's one per-loop input: `evaluate(trainer, loader, ablations)` runs one
    predict loop on them. Ablations that keep heads only at the vital roles take the exact vital-only path
    (`vital.py`) unless `vital_fast_path=False`; others recompute each token only from its first kept layer
    (`active_logits`) or only the suffix from the first ablated position on the plain forward's prefix
    (`prefix_logits`), whichever is cheaper where one is (`active_groups`), unless `active_fast_path=False`.
    `forwards` counts full-sequence forwards, `vital_forwards` vital-only ones, `active_forwards` active-token
    ones, `prefix_forwards` clean-prefix calls."""

    def __init__(self, model_cfg: dict[str, Any], means: torch.Tensor, ablations_per_forward: int = 16,
                 vital_rows_per_forward: int = 2048, vital_fast_path: bool = True, model: LoadedModel | None = None,
                 active_fast_path: bool = True):
        super().__init__(model_cfg, model)
        self.means = means  # [L, T, H, D]
        self.per_forward = ablations_per_forward
        self.vital_rows = vital_rows_per_forward
        self.vital_fast_path = vital_fast_path
        # ablations keeping units at other roles: each token recomputed from its role's first kept layer on, on the
        # all-ablated background (`vital.active_logits`), when that is at most ACTIVE_SHARE of a full forward
        self.active_fast_path = active_fast_path
        self.backgrounds: dict = {}  # (kind, batch index) -> (its tokens, the all-ablated or plain run), reused across calls
        self.acc = AblationAccuracy()
        self.ablations: Sequence[Ablation] = ()
        self.forwards = self.vital_forwards = self.active_forwards = self.prefix_forwards = 0

    def evaluate(self, trainer, loader, ablations: Sequence[Ablation]) -> torch.Tensor:
        """[K, N] correctness of K ablations on the loader's prompts (one predict loop); `self.acc` keeps the
        answer's log-probabilities of the same loop."""
        self.ablations = list(ablations)
        trainer.predict(self, loader, return_predictions=False)
        return self.acc.per_example()

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()
        self.forwards = self.vital_forwards = self.active_forwards = self.prefix_forwards = 0

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        N = len(batch)
        means = self.means.to(self.device)
        fast = [i for i, a in enumerate(self.ablations) if self.vital_fast_path and vital_only(a)]
        slow = [i for i in range(len(self.ablations)) if i not in set(fast)]
        logp = torch.empty(len(self.ablations), N, device=self.device)
        correct = torch.empty(len(self.ablations), N, dtype=torch.bool, device=self.device)

        def record(idx: list[int], logits: torch.Tensor) -> None:  # logits [len(idx)*N, V]
            ans = batch.answer.repeat(len(idx))
            correct[idx] = (logits.argmax(-1) == ans).view(len(idx), N)
            logp[idx] = answer_logp(logits, ans).view(len(idx), N)

        if fast:
            bg = self.background(batch, batch_idx, means)
            step = max(1, self.vital_rows // N)
            for c0 in range(0, len(fast), step):
                idx = fast[c0:c0 + step]
                record(idx, vital_logits(self.net, batch, means, [self.ablations[i] for i in idx], bg))
                self.vital_forwards += 1
        if slow and self.active_fast_path and batch.token_roles is not None:
            groups, prefixed, slow = self.active_groups(slow, batch)
            for idx in groups:
                record(idx, active_logits(self.net, batch, means, [self.ablations[i] for i in idx],
                                          self.background(batch, batch_idx, means)))
                self.active_forwards += 1
            for c0 in range(0, len(prefixed), self.per_forward):
                idx = prefixed[c0:c0 + self.per_forward]
                abls = [self.ablations[i] for i in idx]
                record(idx, prefix_logits(self.net, batch, means, abls, self.clean_rows(batch, batch_idx),
                                          first_ablated(abls, batch)))
                self.prefix_forwards += 1
        for c0 in range(0, len(slow), self.per_forward):
            idx = slow[c0:c0 + self.per_forward]
            rows = batch.repeat(len(idx))
            with hooked(self.net, patches=ablation_patches(means, keep_rows([self.ablations[i] for i in idx], batch))):
                record(idx, last_logits(self.net, rows))  # [K*N, V]
            self.forwards += 1
        self.acc.update(correct, logp, batch.index)

    def background(self, batch: PromptBatch, batch_idx: int, means: torch.Tensor):
        """The batch's all-ablated keys/values (`vital.background`), computed once per evaluation batch: they depend
        only on the prompts and the means."""
        return self._per_batch("background", batch, batch_idx, lambda: background(self.net, batch, means))

    def _per_batch(self, kind: str, batch: PromptBatch, batch_idx: int, compute):
        """A batch's frozen run of `kind`, kept per batch index and reused while the batch holds the same tokens
        (checked token by token), across evaluation calls and splits that return to the same prompts."""
        key = (kind, batch_idx, id(self.means))
        held = self.backgrounds.get(key)
        if held is None or not torch.equal(held[0], batch.input_ids):  # (False for another shape too)
            held = (batch.input_ids, compute())
            self.backgrounds[key] = held
            self.forwards += 1
        return held[1]

    def active_groups(self, idx: list[int], batch: PromptBatch) -> tuple[list[list[int]], list[int], list[int]]:
        """Ablations (indices `idx`) for the two exact shortcuts, each taken where it runs at most ACTIVE_SHARE of a
        full forward's (token, layer) blocks, the cheaper where both do: the active-token path (`active_logits`,
        each token from its start layer: ablations keeping few units), in groups of similar cost holding at most as
        many slots as a full forward of `per_forward` ablations; the clean-prefix path (`prefix_logits`, the suffix
        from the first ablated position: ablations removing a few units from the whole model). Returns (active
        groups, prefix ablations, the ablations left for full forwards)."""
        N, T = batch.input_ids.shape
        L = self.arch.dims.n_layers
        if not idx:
            return [], [], idx
        abls = [self.ablations[i] for i in idx]  # both paths read out at `last`, as every evaluation does
        st = start_layers(abls, batch, L)  # [K, N, T]
        share = (staggered_blocks(st, L).double() / (N * T * L)).tolist()  # one host read
        suffix = ((T - first_ablated(abls, batch)).sum(1).double() / (N * T)).tolist()  # [K] share of a full forward
        prefixed = [i for c, p, i in zip(share, suffix, idx) if p <= ACTIVE_SHARE and p < c]
        slots = (st < L).sum(2).amax(1).tolist()  # [K] the widest prompt's slots
        fits = sorted((c, s, i) for c, p, s, i in zip(share, suffix, slots, idx) if c <= ACTIVE_SHARE and c <= p)
        groups: list[list[int]] = []
        used = 0
        for _, width, i in fits:
            if groups and used + width <= self.per_forward * T:
                groups[-1].append(i)
                used += width
            else:
                groups.append([i])
                used = width
        chosen = {i for g in groups for i in g} | set(prefixed)
        return groups, prefixed, [i for i in idx if i not in chosen]

    def clean_rows(self, batch: PromptBatch, batch_idx: int) -> list:
        """The batch's plain forward (`unpatched_rows`: last logits and the K/V before `last`), computed once per
        evaluation batch, for the clean-prefix path."""
        return self._per_batch("clean", batch, batch_idx, lambda: unpatched_rows(self.net, batch))
