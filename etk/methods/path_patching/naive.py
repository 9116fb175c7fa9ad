"""The definition (SPEC §2.3), kept literal and slow: per sender, one clean forward with every head output frozen
to its clean value except the sender at p_s (MLPs recompute), then one clean forward with the receivers' q/v at
p_s replaced by the values recorded in the first. The fast algorithm is tested against this."""

from __future__ import annotations

from typing import Sequence

import torch

from etk.interventions.components import HeadId, n_units
from etk.interventions.hooks import Capture, Patch, hooked
from etk.methods.path_patching.stages import PPBatch, Receivers, Stage, corrupt_z_per_sender
from etk.models.arch import LlamaFamily
from etk.models.forward import last_logits


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """[B] probability of the answer token, in at least float32 (bf16 logits are promoted, float64 kept)."""
    return torch.softmax(logits.to(prob_dtype(logits)), -1).gather(-1, answer[:, None])[:, 0]


def prob_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or the tensor's dtype when it is wider (float64 runs keep their precision)."""
    return torch.promote_types(t.dtype, torch.float32)


def per_clean(delta: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """delta / p_clean with prompts whose clean probability underflowed to 0 (the ratio is undefined) set to 0;
    `delta` is [B] or [B, S], `p_clean` [B]. Such prompts are left out of the mean (`undefined_prompts`)."""
    ok = (p_clean > 0).reshape(-1, *([1] * (delta.dim() - 1)))
    return torch.where(ok, delta / p_clean.clamp_min(torch.finfo(p_clean.dtype).tiny).reshape(ok.shape), 0.0)


def undefined_prompts(p_clean: torch.Tensor) -> int:
    """How many prompts of the batch have p_clean == 0 (no relative change is defined for them)."""
    return int((p_clean == 0).sum())


@torch.no_grad()
def naive_scores(model, batch: PPBatch, stage: Stage, receivers: Receivers | None,
                 senders: Sequence[HeadId], draws: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """Sum over the batch of (p_patched - p_clean) / p_clean per sender: [n_layers, n_heads] (0 where not run)."""
    dims = LlamaFamily.of(model).dims
    L, H = dims.n_layers, dims.n_heads
    clean, y = batch.clean, batch.clean.answer
    p_s, p_c = batch.positions(stage)
    with hooked(model, captures=[Capture("z", layer) for layer in range(L)]) as zc:
        p_clean = answer_prob(last_logits(model, clean), y)
    at = p_c[:, None] if draws is None else batch.entities(stage)  # [B, 1], or [B, E] for per-sender draws
    with hooked(model, captures=[Capture("z", layer, at) for layer in range(L)]) as zk:
        last_logits(model, batch.corrupt)
    z_corr = {j: zk[("z", j)] if draws is None else corrupt_z_per_sender(zk[("z", j)], draws[:, j])[:, None]
              for j in range(L)}  # [B, 1, H, D]: each head's corrupt z
    B, T = clean.input_ids.shape
    dev = clean.input_ids.device
    freeze = [Patch("z", layer, zc[("z", layer)], torch.zeros(B, T, H, dtype=torch.bool, device=dev)) for layer in range(L)]
    out = torch.zeros(L, H, dtype=torch.float64)
    forwards = 2
    for layer, head in senders:
        keep = torch.ones(B, 1, H, dtype=torch.bool, device=dev)
        keep[:, :, head] = False
        sender = Patch("z", layer, z_corr[layer], keep, p_s[:, None])
        if stage.receiver_site is None:
            with hooked(model, patches=freeze + [sender]):
                p = answer_prob(last_logits(model, clean), y)
            forwards += 1
        else:
            site = receivers.site
            caps = [Capture(site, j, p_s[:, None]) for j in receivers.layers]
            with hooked(model, patches=freeze + [sender], captures=caps) as rec:
                last_logits(model, clean)
            patches = []
            for j in receivers.layers:
                U = n_units(dims, site)
                keep_r = torch.ones(B, 1, U, dtype=torch.bool, device=dev)
                keep_r[:, :, receivers.units[j]] = False
                patches.append(Patch(site, j, rec[(site, j)], keep_r, p_s[:, None]))
            with hooked(model, patches=patches):
                p = answer_prob(last_logits(model, clean), y)
            forwards += 2
        out[layer, head] = per_clean(p - p_clean, p_clean).double().sum()
    tokens_per_forward = int(clean.attention_mask.sum())
    cost = {"forwards": forwards, "token_layer_blocks": forwards * tokens_per_forward * L,
            "undefined_prompts": undefined_prompts(p_clean)}
    return out, cost
