"""Rotary position embedding, rotate-half convention.

For head dimension d and position t, pair dimension j (j < d/2) with j + d/2 and rotate the pair by the
angle t·θ^(-2j/d):
    rope(x)_t = x_t · cos(t·ω) + rotate_half(x_t) · sin(t·ω),   rotate_half([x1, x2]) = [-x2, x1],
where ω = θ^(-2j/d) is repeated twice along the head dimension.

Partial RoPE (techniques.rotary_dims = k < d): the rule above with d := k acts on the first k dimensions
of each head (pairs j, j + k/2 for j < k/2, ω = θ^(-2j/k)); dimensions k..d−1 pass through unchanged.
The tables are then (T, k); k = d is exactly the full rotation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, d); cos, sin: (T, k) with k ≤ d (k < d: partial RoPE). Computed in x's dtype."""
    k = cos.shape[-1]
    if k == x.shape[-1]:
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
    rot, rest = x[..., :k], x[..., k:]
    return torch.cat((rot * cos.to(x.dtype) + rotate_half(rot) * sin.to(x.dtype), rest), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_positions); non-persistent, so they never enter a state dict."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim, device=device), persistent=False)
        self.reset_buffers()

    def _apply(self, fn, recurse=True):
        # .to() / .double() / to_empty() would round or wipe the tables: recompute them instead, keeping
        # at least float32 even when the model is cast to bf16.
        super()._apply(fn, recurse)
        dtype = torch.promote_types(self.cos.dtype, torch.float32)
        if self.cos.dtype != dtype:
            self.cos, self.sin = self.cos.to(dtype), self.sin.to(dtype)
        self.reset_buffers()
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the tables in float64, then round to the buffer dtype."""
        device = self.cos.device
        if device.type == "meta":
            return
        j = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)
        inv_freq = self.theta ** (-j / self.head_dim)
        t = torch.arange(self.max_positions, dtype=torch.float64, device=device)
        angles = torch.outer(t, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Tables for positions [offset, offset + seq_len); offset serves a future KV cache."""
        if offset + seq_len > self.max_positions:
            raise ValueError(
                f"sequence of {seq_len} tokens at offset {offset} exceeds max_position_embeddings "
                f"({self.max_positions})")
        return self.cos[offset:offset + seq_len], self.sin[offset:offset + seq_len]
