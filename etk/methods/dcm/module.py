"""DCM (desiderata-based component masking, SPEC §4) as a LightningModule over a frozen model.

One mask scalar per head of a circuit group; the base run's z at the group's role is interpolated with the
source's z at the source's own role; loss = objective + lambda * sum(1 - m). Only the mask is trained and only
the mask (plus hyper-parameters) is checkpointed."""

from __future__ import annotations

from typing import Any

import torch

from etk.data.roles import ROLE_ID, PairBatch
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet, capture
from etk.interventions.prefix import RowCache, patched_last_logits, row_logits, stack, unpatched_rows, unstack
from etk.methods.base import ModelHost
from etk.methods.dcm.masks import make_mask
from etk.metrics import TaskAccuracy, weighted_mean
from etk.models.arch import LlamaFamily
from etk.models.loading import LoadedModel
from etk.tasks import all_groups, group_role


class DCMModule(ModelHost):
    def __init__(self, model_cfg: dict[str, Any], group: str, heads: list[list[int]], parametrisation: str = "clamp",
                 lam: float = 0.01, lr: float = 0.1, objective: str = "logit", cache_mb: float | str = "auto", model: LoadedModel | None = None,
                 validate_at: int = 0):
        super().__init__(model_cfg, model)
        if group not in all_groups() and group not in ROLE_ID:
            raise ConfigError(f"unknown group {group!r}; groups are {list(all_groups())} (or a position role of a "
                             "position-aware circuit)")
        if objective not in ("logit", "logprob"):
            raise ConfigError(f"unknown objective {objective!r} (logit | logprob)")
        self.role = group_role(group)
        self.headset = HeadSet.at(self.role, heads)
        if not len(self.headset):
            raise ConfigError(f"group {group!r} of the circuit is empty: nothing to mask")
        self.mask = make_mask(parametrisation, len(self.headset))
        self.strict_loading = False  # checkpoints hold the mask only
        self.val_acc, self.test_acc, self.test_floor = TaskAccuracy(), TaskAccuracy(), TaskAccuracy()
        self.cache = RowCache(cache_mb)  # the frozen model's source z and base prefix, per split and pair index
        # validate_at = k > 0: the paper's schedule with a validation after every training batch (the trainer's
        # val_check_interval=1): the mask is scored only after batches whose index within the epoch is a multiple of k
        # (steps 1, 1 + k, ...); the other validations repeat the last score, which never beats itself
        self.validate_at = int(validate_at)
        self._train_batch = -1
        self._last_scores: dict[str, float] | None = None
        self.scored_at: list[int] = []  # the training steps after which the mask was scored (sanity checks left out)

    def configure_model(self) -> None:
        super().configure_model()
        self.headset.check(LlamaFamily.of(self.net).dims)
        self.net.requires_grad_(False)
        self.net.eval()

    def logits(self, batch: PairBatch, m: torch.Tensor, rows: list | None = None) -> torch.Tensor:
        """[B, V] base logits with the group's z at its role mixed with the source's (weights m of the base value).
        The source's z comes from the cache; the base prompts' unpatched prefix (positions before the role) is
        `rows` when given, else from the cache."""
        trainer = getattr(self, "_trainer", None)
        split = None if trainer is None or trainer.state.stage is None else str(trainer.state.stage.value)
        index = batch.base.index
        src = stack(self.cache.get(split and f"{split}/source", index,
                                   lambda: unstack(capture(self.net, batch.source, self.headset))))
        n_heads = LlamaFamily.of(self.net).dims.n_heads
        return patched_last_logits(self.net, batch.base, self.headset.patches(src, batch.base, n_heads, m),
                                   batch.base.roles[self.role], self.cache, split and f"{split}/prefix", rows)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.mask.project_()  # the paper clamps before every step
        self._train_batch = batch_idx

    def _scored_now(self) -> bool:
        """Whether this validation scores the mask (always, except off the paper's schedule)."""
        return self.validate_at <= 0 or self._last_scores is None or self._train_batch % self.validate_at == 0

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        m = self.mask()
        logits = self.logits(batch, m)
        tgt = batch.base.answer
        score = logits if self.hparams.objective == "logit" else torch.log_softmax(logits.float(), -1)
        task = -weighted_mean(score.gather(1, tgt[:, None])[:, 0], batch.base.weight)  # [B] -> scalar
        sparsity = (1 - m).sum()
        loss = task + self.hparams.lam * sparsity
        B = len(batch)
        self.log_dict({"train/loss": loss, "train/task": task, "train/patched_fraction": (m < 0.5).float().mean()},
                      on_step=True, prog_bar=True, batch_size=B)
        return loss

    def binary(self) -> torch.Tensor:
        """[n] bool: True keeps the base value, False patches (the selected heads)."""
        return ~self.mask.selected()

    def on_validation_epoch_start(self) -> None:
        self.val_acc.reset()

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        if self._scored_now():
            self.val_acc.update(self.logits(batch, self.binary()), batch.base.answer, batch.base.index)

    def on_validation_epoch_end(self) -> None:
        if not self._scored_now():
            self.log_dict(self._last_scores)
            return
        acc = self.val_acc.compute()["accuracy"]
        n_sel = int(self.mask.selected().sum())
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and not trainer.sanity_checking:
            self.scored_at.append(int(trainer.global_step))
        # the paper's rule: best accuracy; ties go to the mask that patches more heads
        self._last_scores = {"val/accuracy": acc, "val/n_selected": float(n_sel), "val/select": acc + 1e-6 * n_sel}
        self.log_dict(self._last_scores)

    def on_test_epoch_start(self) -> None:
        self.test_acc.reset()
        self.test_floor.reset()

    def test_step(self, batch: PairBatch, batch_idx: int) -> None:
        own = unpatched_rows(self.net, batch.base)  # one plain forward: the floor's logits and the patched run's prefix
        self.test_acc.update(self.logits(batch, self.binary(), own), batch.base.answer, batch.base.index)
        self.test_floor.update(row_logits(own), batch.base.answer, batch.base.index)  # unpatched model, same targets

    def configure_optimizers(self):
        return torch.optim.Adam(self.mask.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("mask.")}

    def selected_heads(self) -> list[list[int]]:
        sel = self.mask.selected()
        return [list(h) for h, s in zip(self.headset.heads(self.role), sel.tolist()) if s]


