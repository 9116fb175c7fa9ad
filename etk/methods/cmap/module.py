"""CMAP (cross-model activation patching, SPEC §6) and activation patching of head sets, as predict loops.

Both run the target model on the base prompts and replace chosen heads' z at their groups' roles by the z of a
source run: for CMAP the source is the other model on the SAME prompt; for activation patching it is the same
model on the pair's source prompt. Only the needed positions of the source run are kept."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from etk.data.roles import PromptBatch
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import hooked
from etk.methods.circuit_eval.module import AblationAccuracy, answer_logp
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits
from etk.models.pair import PairModels, load_pair

HeadSets = dict[str, HeadSet]  # configuration name -> head set


class CMAPModule(L.LightningModule):
    """Two frozen models; per batch, the target model alone and with each head set patched from the source model.
    A LoRA pair runs on one copy of the base weights, toggling the adapter (see `load_pair`)."""

    def __init__(self, base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], direction: str = "forward",
                 toggle_adapter: bool = True):
        super().__init__()
        if direction not in ("forward", "reverse"):
            raise ConfigError(f"direction must be 'forward' (fine-tuned -> base) or 'reverse', got {direction!r}")
        self.save_hyperparameters()
        self.pair: PairModels | None = None
        self.head_sets: HeadSets = {}
        self.acc = AblationAccuracy()

    def configure_model(self) -> None:
        if self.pair is None:
            self.pair = load_pair(self.hparams.base_cfg, self.hparams.finetuned_cfg, self.hparams.toggle_adapter)

    def on_predict_start(self) -> None:
        """The pair's models are not submodules (one copy may serve both members): put them on the run's device."""
        from etk.models.loading import is_dispatched

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

    @property
    def source_target(self) -> tuple[str, str]:
        return ("finetuned", "base") if self.hparams.direction == "forward" else ("base", "finetuned")

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device)

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
            rows = [source_logits, last_logits(model, batch)]  # the two models alone
            for hs in self.head_sets.values():
                with hooked(model, patches=hs.patches(src, batch, n_heads)):
                    rows.append(last_logits(model, batch))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.answer) for r in rows]),
                        torch.stack([answer_logp(r, batch.answer) for r in rows]), batch.index)
