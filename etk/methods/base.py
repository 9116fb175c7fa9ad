"""The LightningModule every single-model method builds on: it owns a frozen model loaded from its config."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from etk.models.arch import LlamaFamily
from etk.models.loading import LoadedModel, is_dispatched, shared_model
from etk.models.pair import PairModels, load_pair

# constructor inputs that are objects, not settings: never saved as hyper-parameters (nor into checkpoints)
NOT_HPARAMS = ("model", "pair", "means", "head_sets", "stage", "receivers", "senders")


def hold_unregistered(module: L.LightningModule, name: str, net) -> None:
    """`module.<name> = net` without registering `net` as a submodule (so `.cpu()`/`.to()` of the LightningModule,
    and its state_dict, never touch the frozen weights)."""
    module._modules.pop(name, None)
    module.__dict__.pop(name, None)
    object.__setattr__(module, name, net)


def place_model(net, device) -> None:
    """Move a frozen model to `device` unless it is there already (or accelerate dispatched it over devices):
    called at every loop's start, it moves the weights once per run."""
    if net is None or is_dispatched(net):
        return
    first = next(net.parameters(), None)
    if first is not None and first.device != torch.device(device):
        net.to(device)


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
        """Hold `net` as a plain attribute, not a submodule: Lightning's teardown moves the LightningModule to the
        CPU after every loop, and a registered 7B model would cross PCIe twice per loop. `place_model` moves it
        once, at the first loop's start, and it stays there. Lightning's `train()` does not reach it either: the
        frozen model keeps the eval mode it was loaded in through fit loops."""
        self.tokenizer = tokenizer
        hold_unregistered(self, "net", net)

    def configure_model(self) -> None:
        if self.net is None:
            self._attach(*shared_model(OmegaConf.create(self.model_cfg)))

    def on_fit_start(self) -> None:
        place_model(self.net, self.device)

    def on_validation_start(self) -> None:
        place_model(self.net, self.device)

    def on_predict_start(self) -> None:
        place_model(self.net, self.device)

    def on_test_start(self) -> None:
        place_model(self.net, self.device)

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
            place_model(m, self.device)

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
