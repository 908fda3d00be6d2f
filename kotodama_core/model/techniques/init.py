"""Orthogonal init with muP-style (depth-scaled) output projections.

Every hidden matrix W (out × in) is drawn semi-orthogonal: W = gain · Q with Q from the QR decomposition
of a Gaussian matrix (signs fixed by diag(R)), so all min(out, in) singular values equal `gain`.
Input-side projections (q/k/v, gate/up) use gain 1; output projections (o_proj, down_proj), which write
into the residual stream, use gain 1/sqrt(2·num_layers), so the residual stream's growth over depth
stays the same at any depth (the scaling of the default normal init, applied to the spectrum).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def output_projection_gain(num_layers: int) -> float:
    return 1.0 / math.sqrt(2 * num_layers)


@torch.no_grad()
def orthogonal_(p: Tensor, gain: float, generator: torch.Generator | None) -> None:
    """p ← gain · semi-orthogonal matrix; drawn on the CPU in float64, same result on every device."""
    if p.device.type == "meta":
        return
    rows, cols = p.shape
    a = torch.empty(max(rows, cols), min(rows, cols), dtype=torch.float64).normal_(0.0, 1.0, generator=generator)
    q, r = torch.linalg.qr(a)                       # q: (max, min) with orthonormal columns
    signs = torch.diagonal(r).sign()
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)  # the Haar-uniform choice of Q
    w = q if rows >= cols else q.T
    p.copy_((gain * w).to(p.dtype))
