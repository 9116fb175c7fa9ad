"""Attribution screen: a first-order estimate of every sender's path-patching score from one clean forward and
one backward per batch (plus the exact, cheap position-local sender step for the receiver stages).

VF: score ~ <dp/dz_h(p_s), z_corrupt - z_clean> / p_clean, with the gradient taken through the frozen-attention
    path (a single-token residual/MLP chain at p_s, exactly the path the definition allows).
Other stages: score ~ sum_receivers <dp/d(q|v at p_s), delta(q|v)> / p_clean, where delta comes from the exact
    sender step and the gradient from an unfrozen clean forward. Never exact: reported beside exact scores."""

from __future__ import annotations

from typing import Sequence

import torch

from etk.interventions.components import HeadId
from etk.interventions.hooks import Patch, hooked
from etk.methods.path_patching.fast import sender_values, stage_caches
from etk.methods.path_patching.naive import answer_prob, per_clean, undefined_prompts
from etk.methods.path_patching.stages import PPBatch, Receivers, Stage
from etk.models.arch import LlamaFamily


def _frozen_chain_grads(arch: LlamaFamily, c: dict, y: torch.Tensor) -> dict[int, torch.Tensor]:
    """dp/dz at p_s for every layer [B, H, D], through residual + MLPs only (attention outputs frozen)."""
    L = arch.dims.n_layers
    taps = {j: torch.zeros_like(c["z_clean"][j], requires_grad=True) for j in range(L)}
    with torch.enable_grad():
        r = c["h_in"][0]
        for j in range(L):
            r = r + arch.proj(j, "o_proj")((c["z_clean"][j] + taps[j]).flatten(-2))
            r = r + arch.mlp(j)(arch.post_attn_norm(j)(r))
        p = answer_prob(arch.lm_head(arch.final_norm(r)), y)
        p.sum().backward()
    return {j: t.grad for j, t in taps.items()}


def _receiver_grads(model, batch: PPBatch, c: dict, receivers: Receivers) -> dict[int, torch.Tensor]:
    """dp/d(receiver q or v at p_s) [B, U_j, D] from an unfrozen clean forward."""
    arch = LlamaFamily.of(model)
    p_s = c["p_s"]
    B = len(batch)
    taps, patches = {}, []
    with torch.enable_grad():
        for j in receivers.layers:
            base = c["recv_all"][j]  # [B, U, D]
            taps[j] = torch.zeros_like(base, requires_grad=True)
            keep = torch.zeros(B, 1, base.shape[1], device=base.device)  # m = 0: take the source (= clean + tap)
            patches.append(Patch(receivers.site, j, (base + taps[j])[:, None], keep, p_s[:, None]))
    with torch.enable_grad(), hooked(model, patches=patches):
        hid = arch.base.model(**batch.clean.model_inputs(), use_cache=False).last_hidden_state
        p = answer_prob(arch.lm_head(hid[torch.arange(B), batch.clean.roles["last"]]), batch.clean.answer)
        p.sum().backward()
    return {j: taps[j].grad[:, receivers.units[j]] for j in receivers.layers}


def attribution_scores(model, batch: PPBatch, stage: Stage, receivers: Receivers | None,
                       senders: Sequence[HeadId], chunk_rows: int = 4096, draws: torch.Tensor | None = None,
                       **_) -> tuple[torch.Tensor, dict[str, int]]:
    """Estimated sum over the batch of relative probability changes per sender: [n_layers, n_heads]."""
    arch = LlamaFamily.of(model)
    L, H = arch.dims.n_layers, arch.dims.n_heads
    y = batch.clean.answer
    B = len(batch)
    c = stage_caches(model, batch, stage, receivers, draws)
    out = torch.zeros(L, H, dtype=torch.float64, device=y.device)
    tokens = int(batch.clean.attention_mask.sum())
    if receivers is None:
        g = _frozen_chain_grads(arch, c, y)
        for j in range(L):
            est = ((c["z_corr"][j] - c["z_clean"][j]) * g[j]).sum(-1)
            est = per_clean(est, c["p_clean"])  # [B, H]
            out[j] = est.double().sum(0)
        return out, {"forwards": 2, "backwards": 0, "token_layer_blocks": 2 * tokens * L + 3 * B * L,
                     "undefined_prompts": undefined_prompts(c["p_clean"])}
    g = _receiver_grads(model, batch, c, receivers)
    senders = sorted(senders)
    if not senders:
        return out, {"forwards": 3, "backwards": 1, "token_layer_blocks": 3 * tokens * L,
                     "undefined_prompts": undefined_prompts(c["p_clean"])}
    sl = torch.tensor([s.layer for s in senders], device=y.device)
    sh = torch.tensor([s.head for s in senders], device=y.device)
    per_chunk = max(1, chunk_rows // len(senders))
    blocks = 3 * tokens * L
    for b0 in range(0, B, per_chunk):
        bb = torch.arange(b0, min(B, b0 + per_chunk), device=y.device)
        with torch.no_grad():
            vals = sender_values(model, c, stage, receivers, senders, bb, y)
        est = sum(((vals[j] - c["recv_clean"][j][bb, None]) * g[j][bb, None]).sum((-1, -2)) for j in receivers.layers)
        est = per_clean(est, c["p_clean"][bb])  # [n, S]
        out.index_put_((sl, sh), est.double().sum(0), accumulate=True)
        blocks += int(sum(receivers.max_layer - s.layer for s in senders)) * bb.shape[0]
    return out, {"forwards": 3, "backwards": 1, "token_layer_blocks": blocks,
                 "undefined_prompts": undefined_prompts(c["p_clean"])}
