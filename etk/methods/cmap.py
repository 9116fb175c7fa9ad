"""CMAP (cross-model activation patching, SPEC §6) and activation patching of head sets, as predict loops.

Both run the target model on the base prompts and replace chosen heads' z at their groups' roles by the z of a
source run: for CMAP the source is the other model on the SAME prompt; for activation patching it is the same
model on the pair's source prompt. Only the needed positions of the source run are kept."""

from __future__ import annotations

from etk.errors import ConfigError

from typing import Any

import lightning as L
import torch

from etk.circuits import key_role
from etk.data.roles import PairBatch, PromptBatch
from etk.interventions.components import HeadId
from etk.interventions.hooks import Capture, Patch, hooked
from etk.methods.accuracy import ModelHost
from etk.methods.circuit_eval.module import AblationAccuracy
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits, run_through
from etk.models.pair import PairModels, load_pair

HeadSets = dict[str, dict[str, list[HeadId]]]  # config name -> {role: heads}


def role_heads(groups: dict[str, list[HeadId]]) -> dict[str, list[HeadId]]:
    """{group: heads} -> {role: heads} (VF and PT share `last`)."""
    out: dict[str, list[HeadId]] = {}
    for g, heads in groups.items():
        lst = out.setdefault(key_role(g), [])
        lst += [HeadId(int(a), int(b)) for a, b in heads if HeadId(int(a), int(b)) not in lst]
    return out


def union_roles(sets) -> dict[str, list[HeadId]]:
    """The union of several {role: heads} head sets: one source run then serves all of them."""
    out: dict[str, list[HeadId]] = {}
    for roles in sets:
        for role, heads in roles.items():
            lst = out.setdefault(role, [])
            lst += [h for h in heads if h not in lst]
    return out


def _role_captures(batch: PromptBatch, roles: dict[str, list[HeadId]]) -> tuple[dict[int, list[str]], list[Capture]]:
    need: dict[int, list[str]] = {}
    for role, heads in roles.items():
        for j in sorted({h.layer for h in heads}):
            need.setdefault(j, []).append(role)
    caps = [Capture("z", j, torch.stack([batch.roles[r] for r in rs], 1)) for j, rs in need.items()]  # pos [B, R_j]
    return need, caps


def _split(cache, need: dict[int, list[str]]) -> dict[tuple[str, int], torch.Tensor]:
    return {(r, j): cache[("z", j)][:, i:i + 1] for j, rs in need.items() for i, r in enumerate(rs)}


@torch.no_grad()
def capture_roles(model, batch: PromptBatch, roles: dict[str, list[HeadId]]) -> dict[tuple[str, int], torch.Tensor]:
    """z of every head at each role's position for the layers that role needs: {(role, layer): [B, 1, H, D]}.
    One forward, cut after the deepest needed layer; none when no head is listed."""
    need, caps = _role_captures(batch, roles)
    if not need:
        return {}
    with hooked(model, captures=caps) as cache:
        run_through(model, batch, max(need))
    return _split(cache, need)


@torch.no_grad()
def source_run(model, batch: PromptBatch, roles: dict[str, list[HeadId]]):
    """capture_roles and the model's own last-position logits [B, V] from the same (full) forward."""
    need, caps = _role_captures(batch, roles)
    with hooked(model, captures=caps) as cache:
        logits = last_logits(model, batch)
    return _split(cache, need), logits


def role_patches(roles: dict[str, list[HeadId]], src: dict[tuple[str, int], torch.Tensor], target: PromptBatch,
                 n_heads: int) -> list[Patch]:
    """Replace the listed heads' z at each role's position of the target prompts by the source values."""
    out = []
    B = len(target)
    for role, heads in roles.items():
        for j in sorted({h.layer for h in heads}):
            keep = torch.ones(B, 1, n_heads, dtype=torch.bool, device=target.input_ids.device)
            keep[:, :, [h.head for h in heads if h.layer == j]] = False
            out.append(Patch("z", j, src[(role, j)], keep, target.roles[role][:, None]))
    return out


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
            src, source_logits = source_run(model, batch, union_roles(self.head_sets.values()))
        with self.pair.use(target) as model:
            n_heads = LlamaFamily(model).dims.n_heads
            rows = [source_logits, last_logits(model, batch)]  # the two models alone
            for roles in self.head_sets.values():
                with hooked(model, patches=role_patches(roles, src, batch, n_heads)):
                    rows.append(last_logits(model, batch))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.answer) for r in rows]))


class ActivationPatchingModule(ModelHost):
    """Activation patching of head sets within one model: base prompts, source activations from the pair's source
    prompt at the same role (the source's own position, [BUG-SRpos] fixed). Rows: unpatched, then each head set."""

    def __init__(self, model_cfg: dict[str, Any]):
        super().__init__(model_cfg)
        self.head_sets: HeadSets = {}
        self.acc = AblationAccuracy()

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.net)
        self.acc.reset()

    def predict_step(self, batch: PairBatch, batch_idx: int) -> None:
        n_heads = LlamaFamily(self.net).dims.n_heads
        rows = [last_logits(self.net, batch.base)]
        src = capture_roles(self.net, batch.source, union_roles(self.head_sets.values()))  # one source run for all sets
        for roles in self.head_sets.values():
            with hooked(self.net, patches=role_patches(roles, src, batch.base, n_heads)):
                rows.append(last_logits(self.net, batch.base))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.base.answer) for r in rows]))
