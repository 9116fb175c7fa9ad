"""Task accuracy as a Lightning predict loop: argmax at the last position equals the answer token."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from etk.data.roles import PromptBatch
from etk.metrics import TaskAccuracy
from etk.models.forward import assert_eval, last_logits
from etk.models.loading import load_model
from omegaconf import OmegaConf


class ModelHost(L.LightningModule):
    """A LightningModule that owns a frozen model built from its `model` config (loaded once, in
    `configure_model`, so hyper-parameters stay plain and checkpoints never contain the weights)."""

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = model_cfg
        self.net = None
        self.tokenizer = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        self.net, self.tokenizer = load_model(OmegaConf.create(self.model_cfg))

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """etk batches are dataclasses with a `.to(device)` that moves every tensor (roles included)."""
        return batch.to(device) if hasattr(batch, "to") else super().transfer_batch_to_device(batch, device, dataloader_idx)


class AccuracyModule(ModelHost):
    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)
        self.acc = TaskAccuracy()

    def on_predict_epoch_start(self) -> None:
        self.acc.reset()
        assert_eval(self.net)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        logits = last_logits(self.net, batch)  # [B, V]
        self.acc.update(logits, batch.answer)
        return logits.argmax(-1)
