"""Circuit evaluation as Lightning predict loops: per-position means, then many ablations per forward."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from etk.data.roles import PromptBatch
from etk.interventions.hooks import Capture, hooked
from etk.methods.accuracy import ModelHost
from etk.methods.circuit_eval.ablation import Ablation, ablation_patches, keep_rows, repeat_batch
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits


class AblationAccuracy(Metric):
    """Per-example correctness of K ablations: state [N, K] concatenated over batches; compute() -> [K]."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, correct: torch.Tensor) -> None:  # [K, B] bool
        self.correct.append(correct.T.float())

    def per_example(self) -> torch.Tensor:
        """[K, N] correctness."""
        return dim_zero_cat(self.correct).T if self.correct else torch.zeros(0, 0)

    def compute(self) -> torch.Tensor:
        return self.per_example().mean(1)


class AblationEval(ModelHost):
    """`mode="means"`: accumulate per-position z means over the ablation prompts.
    `mode="eval"`: accuracy of every ablation in `self.ablations` on every prompt."""

    def __init__(self, model_cfg: dict[str, Any], ablations_per_forward: int = 16):
        super().__init__(model_cfg)
        self.per_forward = ablations_per_forward
        self.acc = AblationAccuracy()
        self.mode = "eval"
        self.means: torch.Tensor | None = None
        self.ablations: Sequence[Ablation] = ()

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()
        if self.mode == "means":
            self._sum, self._count = None, None
        self.forwards = 0

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if self.mode == "means":
            return self._means_step(batch)
        out = []
        N = len(batch)
        for c0 in range(0, len(self.ablations), self.per_forward):
            abl = list(self.ablations[c0:c0 + self.per_forward])
            rows = repeat_batch(batch, len(abl))
            keep = keep_rows(abl, batch)
            with hooked(self.net, patches=ablation_patches(self.means.to(self.device), keep)):
                logits = last_logits(self.net, rows)  # [K*N, V]
            out.append((logits.argmax(-1) == rows.answer).view(len(abl), N))
            self.forwards += 1
        self.acc.update(torch.cat(out))

    def _means_step(self, batch: PromptBatch) -> None:
        dims = LlamaFamily(self.net).dims
        with hooked(self.net, captures=[Capture("z", j) for j in range(dims.n_layers)]) as cache:
            LlamaFamily(self.net).base.model(**batch.model_inputs(), use_cache=False)
        z = torch.stack([cache[("z", j)] for j in range(dims.n_layers)])  # [L, B, T, H, D]
        m = batch.attention_mask.to(z.dtype)[None, :, :, None, None]
        s, c = (z * m).sum(1).double(), batch.attention_mask.sum(0)
        if self._sum is None:
            self._sum, self._count = s, c
        else:
            if s.shape[1] != self._sum.shape[1]:
                raise ValueError("ablation prompts of different lengths: use one n_boxes/template per ablation set")
            self._sum, self._count = self._sum + s, self._count + c

    def finish_means(self) -> torch.Tensor:
        """[L, T, H, D] per-position means (pads excluded)."""
        self.means = (self._sum / self._count.clamp_min(1)[None, :, None, None]).to(self._sum.dtype).float().cpu()
        return self.means
