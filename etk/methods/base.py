"""The LightningModule every single-model method builds on: it owns a frozen model loaded from its config."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import OmegaConf

from etk.models.arch import LlamaFamily
from etk.models.loading import is_dispatched, load_model


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
        net, self.tokenizer = load_model(OmegaConf.create(self.model_cfg))
        if is_dispatched(net):  # split over devices by accelerate: not a submodule, so Lightning never moves it
            self.__dict__.pop("net", None)
            object.__setattr__(self, "net", net)
        else:
            self.net = net

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """etk batches are dataclasses with a `.to(device)` that moves every tensor (roles included); a dispatched
        model receives its batches on its first module's device."""
        if self.net is not None and is_dispatched(self.net):
            device = LlamaFamily.of(self.net).device
        return batch.to(device) if hasattr(batch, "to") else super().transfer_batch_to_device(batch, device, dataloader_idx)

    @property
    def arch(self) -> LlamaFamily:
        """The model's architecture adapter (built once per model)."""
        return LlamaFamily.of(self.net)

