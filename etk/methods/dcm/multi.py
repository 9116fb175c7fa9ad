"""DCM for many masks at once: every (group, head set) mask of one model and one desideratum trained in one fit loop
over the frozen model (the study's jobs of a member and desideratum; a single `train_dcm.py` job is the case J = 1).

What the masks share is computed once per pair and kept (`RowCache`): the source run's z at every head any mask
needs, and the base prompt's clean run — its residual entering each role's start layer (the lowest layer of the
heads masked at that role) and its K/V from the lowest start up. Each step then runs the masks of one role together
(rows = masks x prompts), one forward per distinct position of the role in the batch, through layers start..L-1 at
positions >= that position only: nothing below the start layer or before the patched position can change. The loss is the sum of the masks' losses: each mask's gradient is its own loss's, and Adam's update is per
parameter, so every mask follows the trajectory it has alone (`dcm.reference=true` trains one `DCMModule` per job:
the check, equal up to float rounding). Validation depends only on each mask's binarised form: a binary mask scored
once is not run again. The best mask of each job is kept as ModelCheckpoint(monitor="val/select", mode="max") keeps
it (the first strict maximum; one save per global step)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from etk.data.roles import ROLE_ID, PairBatch, PromptBatch
from etk.errors import ConfigError
from etk.interventions.heads import HeadSet, capture
from etk.interventions.hooks import Patch, hooked
from etk.interventions.prefix import RowCache, stack, unstack
from etk.methods.base import ModelHost
from etk.methods.dcm.masks import make_mask
from etk.metrics import TaskAccuracy, weighted_mean
from etk.models.arch import LlamaFamily
from etk.models.forward import output_cache
from etk.models.loading import LoadedModel
from etk.models.partial import LayerInputs, forward_from_layer
from etk.tasks import all_groups, group_role

DETERMINISTIC = ("clamp", "sigmoid")  # parametrisations with no sampling: the joint fit equals the solo fits


@torch.no_grad()
def clean_rows(model, batch: PromptBatch, starts: Sequence[int]) -> list[dict[Any, torch.Tensor]]:
    """Per prompt, from one clean forward: "ids" [T], "logits" [V] at `last`, ("h", s) [T, d] the residual
    entering each layer s of `starts`, and the K/V ("k"/"v", layer) [G, T, D] of every layer >= min(starts)."""
    arch = LlamaFamily.of(model)
    with LayerInputs(arch, None, sorted(set(starts))) as h:
        out = arch.base.model(**batch.model_inputs(), use_cache=True)
    cache = output_cache(out)
    logits = arch.lm_head(out.last_hidden_state[torch.arange(len(batch), device=batch.input_ids.device),
                                                batch.roles["last"]])  # [B, V] the unpatched model's
    rows = []
    for b in range(len(batch)):
        row: dict[Any, torch.Tensor] = {"ids": batch.input_ids[b].clone(), "logits": logits[b].clone(),
                                        **{("h", s): h[s][b].clone() for s in h}}
        for j in range(min(starts), arch.dims.n_layers):
            row[("k", j)], row[("v", j)] = cache.layers[j].keys[b].clone(), cache.layers[j].values[b].clone()
        rows.append(row)
    return rows


class MultiDCMModule(ModelHost):
    """J DCM masks over one frozen model, one per (group, heads) of `jobs`, trained on the same pairs."""

    def __init__(self, model_cfg: dict[str, Any], jobs: Sequence[tuple[str, list[list[int]]]], parametrisation: str = "clamp",
                 lam: float = 0.01, lr: float = 0.1, objective: str = "logit", cache_mb: float | str = "auto",
                 model: LoadedModel | None = None, validate_at: int = 0):
        super().__init__(model_cfg, model)
        if objective not in ("logit", "logprob"):
            raise ConfigError(f"unknown objective {objective!r} (logit | logprob)")
        if parametrisation not in DETERMINISTIC:
            raise ConfigError(f"the joint DCM fit needs a deterministic mask ({', '.join(DETERMINISTIC)}); "
                              f"{parametrisation} samples noise: run it with dcm.reference=true")
        self.groups = [g for g, _ in jobs]
        for g in self.groups:
            if g not in all_groups() and g not in ROLE_ID:
                raise ConfigError(f"unknown group {g!r}; groups are {list(all_groups())} (or a position role of a "
                                  "position-aware circuit)")
        self.roles = [group_role(g) for g in self.groups]
        self.headsets = [HeadSet.at(r, heads) for r, (_, heads) in zip(self.roles, jobs)]
        for g, hs in zip(self.groups, self.headsets):
            if not len(hs):
                raise ConfigError(f"group {g!r} of the circuit is empty: nothing to mask")
        self.union = HeadSet.union(self.headsets)
        # masks at one role run together from the lowest layer of their heads (nothing below it can change)
        self.starts = {r: min(hs.layers()[0] for hs, r2 in zip(self.headsets, self.roles) if r2 == r) for r in self.roles}
        self.masks = nn.ModuleList([make_mask(parametrisation, len(hs)) for hs in self.headsets])
        self.strict_loading = False
        self.val_accs = nn.ModuleList([TaskAccuracy() for _ in jobs])
        self.test_accs = nn.ModuleList([TaskAccuracy() for _ in jobs])
        self.test_floor = TaskAccuracy()
        self.cache = RowCache(cache_mb)  # source z (all masks' heads) and the base prompts' clean rows, per split
        self.validate_at = int(validate_at)  # the paper's schedule (see DCMModule)
        self._train_batch = -1
        self.scored_at: list[int] = []
        self.memo: list[dict[bytes, float]] = [{} for _ in jobs]  # per mask: binary mask -> validation accuracy
        self.best: list[dict[str, Any] | None] = [None for _ in jobs]  # per mask: {select, state, step}
        self._saved_step = [-1 for _ in jobs]  # per mask: the global step of its last save (ModelCheckpoint's rule)
        self._to_score: list[int] = []
        self.validations_run = 0  # (mask, validation) evaluations actually run (the rest read the memo)

    def configure_model(self) -> None:
        super().configure_model()
        dims = LlamaFamily.of(self.net).dims
        for hs in self.headsets:
            hs.check(dims)
        self.net.requires_grad_(False)
        self.net.eval()

    # -- the frozen work, once per pair -----------------------------------------------------------------------
    def frozen(self, batch: PairBatch) -> tuple[dict, dict]:
        """(source z {(role, layer): [B, 1, H, D]}, clean base rows stacked {key: [B, ...]}), from the cache."""
        trainer = getattr(self, "_trainer", None)
        split = None if trainer is None or trainer.state.stage is None else str(trainer.state.stage.value)
        index, base = batch.base.index, batch.base
        T = base.input_ids.shape[1]
        same = lambda b, row: row["ids"].shape[0] == T and torch.equal(row["ids"], base.input_ids[b])  # noqa: E731
        src = stack(self.cache.get(split and f"{split}/source", index,
                                   lambda: unstack(capture(self.net, batch.source, self.union))))
        rows = stack(self.cache.get(split and f"{split}/clean", index,
                                    lambda: clean_rows(self.net, base, list(self.starts.values())), same))
        return src, rows

    def patched_logits(self, batch: PairBatch, jobs: list[int], masks: list[torch.Tensor]) -> torch.Tensor:
        """[len(jobs), B, V] last-position logits of the base prompts with mask k's group patched from the source
        (weights masks[k] [n_k] of the base value: float interpolates, bool keeps/replaces). The masks of one role
        run in one forward per distinct position of that role in the batch: each row from its own patched position
        and its role's start layer."""
        src, rows = self.frozen(batch)
        B = len(batch.base)
        out: list[torch.Tensor | None] = [None] * len(jobs)
        pos_of: dict[str, list[int]] = {}
        for k, (j, m) in enumerate(zip(jobs, masks)):
            if m.dtype == torch.bool and bool(m.all()):  # a binary mask patching nothing: the unpatched logits
                out[k] = rows["logits"]
            else:
                pos_of.setdefault(self.roles[j], []).append(k)
        for role, ks in pos_of.items():
            where = batch.base.roles[role]  # [B]
            for u in where.unique().tolist():  # one host read per role and batch
                idx = (where == u).nonzero()[:, 0]
                part = self._forward(batch.base.rows(idx), {k: v[idx] for k, v in src.items()},
                                     {k: v[idx] for k, v in rows.items()}, [jobs[k] for k in ks], [masks[k] for k in ks],
                                     int(u), self.starts[role])  # [len(ks), n, V]
                for i, k in enumerate(ks):
                    full = out[k] if out[k] is not None else part.new_zeros(B, part.shape[-1])
                    out[k] = full.index_copy(0, idx, part[i])
        return torch.stack(out)  # type: ignore[arg-type]

    def _forward(self, base: PromptBatch, src: dict, rows: dict, jobs: list[int], masks: list[torch.Tensor], s: int,
                 start: int) -> torch.Tensor:
        """[J, n, V]: masks of one role over n prompts whose patched position is s, from layer `start` on, at
        positions >= s, on the clean K/V before s (rows = mask k's prompts at k*n + b)."""
        arch = LlamaFamily.of(self.net)
        n_heads = arch.dims.n_heads
        J, n = len(jobs), len(base)
        by_layer: dict[int, list[tuple[int, Patch]]] = {}
        for k, (j, m) in enumerate(zip(jobs, masks)):
            for p in self.headsets[j].patches(src, base, n_heads, m):
                by_layer.setdefault(p.layer, []).append((k, p))
        patches = []
        for layer, parts in by_layer.items():  # one patch per layer over all J * n rows (mask k's rows keep the rest)
            first = parts[0][1]
            source = first.source.new_zeros(J, *first.source.shape)  # [J, n, 1, H, D]
            keep = torch.ones(J, *first.keep.shape, dtype=first.keep.dtype, device=source.device)  # [J, n, 1, H]
            for k, p in parts:
                source[k], keep[k] = p.source, p.keep
            pos = torch.full((J * n, 1), s, dtype=torch.long, device=source.device)  # every row's patched position
            patches.append(Patch("z", layer, source.flatten(0, 1), keep.flatten(0, 1), pos - s))
        reps = base.repeat(J)
        hidden = rows[("h", start)][:, s:].repeat(J, 1, 1)  # [J*n, T - s, d]
        prefix = None
        if s > 0:
            kv = [(rows[("k", j)][:, :, :s].repeat(J, 1, 1, 1), rows[("v", j)][:, :, :s].repeat(J, 1, 1, 1))
                  for j in range(start, arch.dims.n_layers)]
            prefix = DynamicCache([kv[0]] * start + kv, config=arch.base.config)  # below `start`: length only
        with hooked(self.net, patches=patches):
            hid = forward_from_layer(self.net, hidden, start, reps.attention_mask, reps.position_ids[:, s:], prefix)
        r = torch.arange(J * n, device=hid.device)
        return arch.lm_head(hid[r, reps.roles["last"] - s]).view(J, n, -1)

    # -- training ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        for mask in self.masks:
            mask.project_()
        self._train_batch = batch_idx

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        ms = [mask() for mask in self.masks]
        logits = self.patched_logits(batch, list(range(len(ms))), ms)  # [J, B, V]
        tgt = batch.base.answer
        loss = logits.new_zeros(())
        for k, m in enumerate(ms):
            score = logits[k] if self.hparams.objective == "logit" else torch.log_softmax(logits[k].float(), -1)
            task = -weighted_mean(score.gather(1, tgt[:, None])[:, 0], batch.base.weight)
            loss = loss + task + self.hparams.lam * (1 - m).sum()
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.masks.parameters(), lr=self.hparams.lr)

    # -- validation: each binary mask scored once -----------------------------------------------------------------
    def binary(self, k: int) -> torch.Tensor:
        """[n] bool: True keeps the base value, False patches (the selected heads)."""
        return ~self.masks[k].selected()

    def _scored_now(self) -> bool:
        return self.validate_at <= 0 or all(b is None for b in self.best) or self._train_batch % self.validate_at == 0

    def on_validation_epoch_start(self) -> None:
        for acc in self.val_accs:
            acc.reset()
        keys = [self.binary(k).cpu().numpy().tobytes() for k in range(len(self.masks))]
        self._keys = keys
        self._to_score = [k for k in range(len(self.masks)) if keys[k] not in self.memo[k]] if self._scored_now() else []

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        if self._to_score:
            logits = self.patched_logits(batch, self._to_score, [self.binary(k) for k in self._to_score])
            for i, k in enumerate(self._to_score):
                self.val_accs[k].update(logits[i], batch.base.answer, batch.base.index)

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        if trainer.sanity_checking or not self._scored_now():
            return
        for k in self._to_score:
            self.memo[k][self._keys[k]] = self.val_accs[k].compute()["accuracy"]
        self.validations_run += len(self._to_score)
        self.scored_at.append(int(trainer.global_step))
        for k, mask in enumerate(self.masks):
            if self._saved_step[k] == trainer.global_step:  # ModelCheckpoint saves at most once per global step
                continue
            acc = self.memo[k][self._keys[k]]
            n_sel = int(mask.selected().sum())
            select = torch.tensor(acc + 1e-6 * n_sel, dtype=torch.float32)  # as logged (the paper's tie rule)
            if self.best[k] is None or bool(select > self.best[k]["select"]):
                self.best[k] = {"select": select, "accuracy": acc, "step": int(trainer.global_step),
                                "state": {n: t.detach().clone() for n, t in mask.state_dict().items()}}
                self._saved_step[k] = int(trainer.global_step)

    # -- test: each job's best mask -----------------------------------------------------------------------------
    def use_best(self) -> None:
        """Load every mask's best state (a mask never validated keeps its last state)."""
        for k, mask in enumerate(self.masks):
            if self.best[k] is not None:
                mask.load_state_dict(self.best[k]["state"])

    def on_test_epoch_start(self) -> None:
        for acc in self.test_accs:
            acc.reset()
        self.test_floor.reset()

    def test_step(self, batch: PairBatch, batch_idx: int) -> None:
        jobs = list(range(len(self.masks)))
        logits = self.patched_logits(batch, jobs, [self.binary(k) for k in jobs])
        for k in jobs:
            self.test_accs[k].update(logits[k], batch.base.answer, batch.base.index)
        self.test_floor.update(self.frozen(batch)[1]["logits"], batch.base.answer, batch.base.index)  # unpatched

    def selected_heads(self, k: int) -> list[list[int]]:
        sel = self.masks[k].selected()
        return [list(h) for h, s in zip(self.headsets[k].heads(self.roles[k]), sel.tolist()) if s]
