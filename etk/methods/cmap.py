"""CMAP (cross-model activation patching, SPEC §6) and activation patching of head sets, as predict loops.

Both run the target model on the base prompts and replace chosen heads' z at their groups' roles by the z of a
source run: for CMAP the source is the other model on the SAME prompt; for activation patching it is the same
model on the pair's source prompt. Only the needed positions of the source run are kept."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from etk.circuits import GROUP_ROLE
from etk.data.roles import PairBatch, PromptBatch
from etk.interventions.components import HeadId
from etk.interventions.hooks import Capture, Patch, hooked
from etk.methods.accuracy import ModelHost
from etk.methods.circuit_eval.module import AblationAccuracy
from etk.models.arch import LlamaFamily
from etk.models.forward import assert_eval, last_logits
from etk.models.loading import load_model
from etk.models.pair import check_compatible

HeadSets = dict[str, dict[str, list[HeadId]]]  # config name -> {role: heads}


def role_heads(groups: dict[str, list[HeadId]]) -> dict[str, list[HeadId]]:
    """{group: heads} -> {role: heads} (VF and PT share `last`)."""
    out: dict[str, list[HeadId]] = {}
    for g, heads in groups.items():
        lst = out.setdefault(GROUP_ROLE[g], [])
        lst += [HeadId(int(a), int(b)) for a, b in heads if HeadId(int(a), int(b)) not in lst]
    return out


@torch.no_grad()
def capture_roles(model, batch: PromptBatch, roles: dict[str, list[HeadId]]) -> dict[tuple[str, int], torch.Tensor]:
    """z at each role's position for the layers that role needs, in one forward: {(role, layer): [B, 1, H, D]}."""
    need: dict[int, list[str]] = {}
    for role, heads in roles.items():
        for j in sorted({h.layer for h in heads}):
            need.setdefault(j, []).append(role)
    caps = [Capture("z", j, torch.stack([batch.roles[r] for r in rs], 1)) for j, rs in need.items()]  # pos [B, R_j]
    with hooked(model, captures=caps) as cache:
        LlamaFamily(model).base.model(**batch.model_inputs(), use_cache=False)
    return {(r, j): cache[("z", j)][:, i:i + 1] for j, rs in need.items() for i, r in enumerate(rs)}


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
    """Two frozen models; per batch, the target model alone and with each head set patched from the source model."""

    def __init__(self, base_cfg: dict[str, Any], finetuned_cfg: dict[str, Any], direction: str = "forward"):
        super().__init__()
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be 'forward' (fine-tuned -> base) or 'reverse', got {direction!r}")
        self.save_hyperparameters()
        self.base_net = self.ft_net = None
        self.head_sets: HeadSets = {}
        self.acc = AblationAccuracy()

    def configure_model(self) -> None:
        if self.base_net is not None:
            return
        self.base_net, self.tokenizer = load_model(OmegaConf.create(self.hparams.base_cfg))
        self.ft_net, ft_tok = load_model(OmegaConf.create(self.hparams.finetuned_cfg))
        check_compatible(self.base_net, self.ft_net, self.tokenizer, ft_tok,
                         (self.hparams.base_cfg["name"], self.hparams.finetuned_cfg["name"]))

    @property
    def source_target(self):
        return (self.ft_net, self.base_net) if self.hparams.direction == "forward" else (self.base_net, self.ft_net)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device)

    def on_predict_epoch_start(self) -> None:
        assert_eval(self.base_net)
        assert_eval(self.ft_net)
        self.acc.reset()

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> None:
        source, target = self.source_target
        n_heads = LlamaFamily(target).dims.n_heads
        rows = [last_logits(source, batch), last_logits(target, batch)]  # the two models alone
        for roles in self.head_sets.values():
            src = capture_roles(source, batch, roles)
            with hooked(target, patches=role_patches(roles, src, batch, n_heads)):
                rows.append(last_logits(target, batch))
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
        for roles in self.head_sets.values():
            src = capture_roles(self.net, batch.source, roles)
            with hooked(self.net, patches=role_patches(roles, src, batch.base, n_heads)):
                rows.append(last_logits(self.net, batch.base))
        self.acc.update(torch.stack([(r.argmax(-1) == batch.base.answer) for r in rows]))
