"""Attention-pattern statistics from softmax probabilities of shape (B, H, T, T), rows = queries."""

from __future__ import annotations

import torch


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"attention probabilities must have shape (B, H, T, T), got {tuple(probs.shape)}")
    if probs.shape[-1] < 2:
        raise ValueError("need at least 2 positions: query 0 can only attend to itself")
    return probs.detach().float()


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-head attention entropy in nats, shape (H,).

    H_h = mean_{b, t ≥ 1} [ −Σ_s p_{b,h,t,s} ln p_{b,h,t,s} ]   (0 · ln 0 := 0).

    Query 0 is left out because causal masking forces it onto itself (entropy 0 whatever the model
    learned). Uniform causal attention over t+1 keys gives ln(t+1).
    """
    p = _check_probs(probs)[:, :, 1:, :]
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    return (-plogp.sum(-1)).mean(dim=(0, 2))


def bos_attention_mass(probs: torch.Tensor) -> torch.Tensor:
    """Per-head share of attention on the first (BOS) position, shape (H,).

    m_h = mean_{b, t ≥ 1} p_{b,h,t,0}; query 0 is left out (its mass on BOS is 1 by causality).
    """
    p = _check_probs(probs)
    return p[:, :, 1:, 0].mean(dim=(0, 2))
