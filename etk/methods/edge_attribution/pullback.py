"""Gradients pulled back to a receiver's own input: a receiver (a head's q, a KV group's k or v, an MLP) reads the
residual stream through a norm shared with other receivers, so the gradient of the metric with respect to the
residual *along one receiver's path* is the norm's Jacobian transposed applied to that receiver's gradient at the
norm's output. Edge attribution contracts it with each sender's output difference."""

from __future__ import annotations

import torch


def rmsnorm_pullback(weight: torch.Tensor, eps: float, r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J^T g for y = weight * r / sqrt(mean(r^2) + eps) (Llama/Qwen/Mistral RMSNorm), at input r [..., d], for the
    gradient g [..., d] at y: s * (weight * g) - (s^3 / d) * r * <weight * g, r>, s = (mean(r^2) + eps)^(-1/2).
    Computed in at least fp32, returned in g's dtype."""
    acc = torch.promote_types(r.dtype, torch.float32)
    r32, wg = r.to(acc), (weight.to(acc) * g.to(acc))
    s = torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    out = s * wg - (s.pow(3) / r.shape[-1]) * r32 * (wg * r32).sum(-1, keepdim=True)
    return out.to(g.dtype)
