"""Task accuracy as a Lightning predict loop: argmax at the last position equals the answer token; and, for tasks
whose prompts name a distractor (IOI: the subject), the logit difference answer - distractor."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import PromptBatch
from etk.methods.base import ModelHost
from etk.metrics import LogitDifference, TaskAccuracy
from etk.models.forward import assert_eval, last_logits
from etk.models.loading import LoadedModel


class AccuracyModule(ModelHost):
    def __init__(self, model_cfg: dict[str, Any], model: LoadedModel | None = None):
        super().__init__(model_cfg, model)
        self.acc = TaskAccuracy()
        self.logit_diff = LogitDifference()

    def on_predict_epoch_start(self) -> None:
        self.acc.reset()
        self.logit_diff.reset()
        assert_eval(self.net)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        logits = last_logits(self.net, batch)  # [B, V]
        self.acc.update(logits, batch.answer, batch.index)
        self.logit_diff.update(logits, batch.answer, batch.distractor, batch.index)
        return logits.argmax(-1)
