"""Exclusive self attention (XSA): remove from each head's output its component along the token's own value.

For query head h with kv head g = h // (H / KV), token t, attention output o and own value v = v_g[t]:
    v̂ = v / max(‖v‖, eps),      o ← o − (o · v̂) v̂
so the result is orthogonal to the token's own value vector: attention carries only what other
positions add.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def exclusive_self_attention(out: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """out (B, H, T, d) attention output, v (B, KV, T, d) values -> out minus its projection on v̂."""
    b, h, t, d = out.shape
    kv = v.shape[1]
    o = out.view(b, kv, h // kv, t, d)            # heads of one kv group share its value vector
    v_hat = F.normalize(v.to(out.dtype), dim=-1, eps=eps).unsqueeze(2)
    o = o - (o * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return o.view(b, h, t, d)
