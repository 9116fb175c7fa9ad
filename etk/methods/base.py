"""The LightningModule every single-model method builds on: it owns a frozen model loaded from its config."""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import OmegaConf

from etk.models.arch import LlamaFamily
from etk.models.loading import LoadedModel, is_dispatched, shared_model
from etk.models.pair import PairModels, load_pair

# constructor inputs that are objects, not settings: never saved as hyper-parameters (nor into checkpoints)
NOT_HPARAMS = ("model", "pair", "means", "head_sets", "stage", "receivers", "senders")


class ModelHost(L.LightningModule):
    """A LightningModule that owns a frozen model: the `LoadedModel` it is given at construction (the runners and
    the Python API load it once with `etk.models.loading.load`), or one built from its `model` config in
    Lightning's `configure_model` hook. Hyper-parameters stay plain and checkpoints never contain the weights."""

    def __init__(self, model_cfg: dict[str, Any], model: LoadedModel | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=list(NOT_HPARAMS))
        self.model_cfg = model_cfg
        self.net = None
        self.tokenizer = None
        if model is not None:
            self._attach(model.net, model.tokenizer)

    def _attach(self, net, tokenizer) -> None:
        self.tokenizer = tokenizer
        if is_dispatched(net):  # split over devices by accelerate: not a submodule, so Lightning never moves it
            self.__dict__.pop("net", None)
            object.__setattr__(self, "net", net)
        else:
            self.net = net

    def configure_model(self) -> None:
        if self.net is None:
            self._attach(*shared_model(OmegaConf.create(self.model_cfg)))

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


class PairHost(L.LightningModule):
    """A LightningModule that owns the two frozen members of a pair (`etk.models.pair.load_pair`: a LoRA pair runs
    on one copy of the base weights, toggling the adapter). The models are not submodules (one copy may serve both
    members), so they are moved to the run's device at predict start."""

    def __init__(self, base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], toggle_adapter: bool = True,
                 pair: PairModels | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=list(NOT_HPARAMS))
        self.pair = pair

    def configure_model(self) -> None:
        if self.pair is None:
            self.pair = load_pair(self.hparams.base_cfg, self.hparams.finetuned_cfg, self.hparams.toggle_adapter)

    def on_predict_start(self) -> None:
        for m in {id(self.pair.base): self.pair.base, id(self.pair.finetuned): self.pair.finetuned}.values():
            if not is_dispatched(m):
                m.to(self.device)

    @property
    def tokenizer(self):
        return self.pair.tokenizer

    @property
    def base_net(self):
        return self.pair.base

    @property
    def ft_net(self):
        return self.pair.finetuned

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device)
