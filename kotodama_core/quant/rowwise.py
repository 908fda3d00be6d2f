"""Per-row symmetric integer quantization, the straight-through fake quantizer, and bit packing.

For a weight matrix W (rows × cols, higher-rank tensors are flattened to rows × rest) and b bits:
    qmax  = 2^(b−1) − 1                          (127, 31, 15, 7 for b = 8, 6, 5, 4)
    s_r   = fp16(max_j |W_rj| / qmax)            (one fp16 scale per row, floored at fp16's smallest
                                                  normal number so an all-zero row stays finite)
    q_rj  = clamp(round(W_rj / s_r), −qmax, qmax)
    Ŵ_rj  = q_rj · s_r
The grid is symmetric (−2^(b−1) is never used), so |W_rj − Ŵ_rj| ≤ s_r / 2 for every entry: rounding
costs at most half a step, and the clamp only bites when fp16 rounded s_r below max|W|/qmax, which costs
at most qmax · 2⁻¹¹ · s_r < s_r / 2.

Straight-through estimator: fake_quantize(W) = W + (Ŵ − W).detach(), so the forward pass sees Ŵ and
∂/∂W is the identity.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SCALE_DTYPE = torch.float16
_MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny


def qmax(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"integer quantization supports 2..8 bits, got {bits}")
    return (1 << (bits - 1)) - 1


def _rows(w: Tensor) -> Tensor:
    if w.ndim < 2:
        raise ValueError(f"per-row quantization needs a tensor of 2 or more dimensions, got {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def row_scales(w: Tensor, bits: int) -> Tensor:
    """fp16 scale per row: max |row| / qmax, rounded to fp16 (shape (rows,))."""
    amax = _rows(w).detach().float().abs().amax(dim=1)
    return (amax / qmax(bits)).clamp(min=_MIN_SCALE).to(SCALE_DTYPE)


def quantize_rows(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(codes int8 of w's shape with values in [−qmax, qmax], fp16 scales (rows,))."""
    scale = row_scales(w, bits)
    m = qmax(bits)
    rows = _rows(w).detach().float()
    q = torch.clamp(torch.round(rows / scale.float()[:, None]), -m, m).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (_rows(q).float() * scale.float()[:, None]).reshape(q.shape).to(dtype)


def fake_quantize(w: Tensor, bits: int) -> Tensor:
    """w + (dequantize(quantize(w)) − w).detach(): quantized values forward, identity gradient backward."""
    m = qmax(bits)
    rows = _rows(w)
    scale = (rows.detach().float().abs().amax(dim=1, keepdim=True) / m).clamp(min=_MIN_SCALE)
    scale = scale.to(SCALE_DTYPE).float()
    deq = (torch.clamp(torch.round(rows.detach().float() / scale), -m, m) * scale).to(w.dtype)
    return w + (deq.reshape(w.shape) - w).detach()


# ---------------------------------------------------------------- packing
def pack_int4(q: Tensor) -> Tensor:
    """Signed 4-bit codes (any shape, values in [−8, 7]) → uint8, two codes per byte.

    Code k goes to byte k // 2: even k in the high nibble, odd k in the low nibble, each as the 4-bit
    two's complement; an odd count is padded with a zero code.
    """
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = (flat & 0xF).to(torch.uint8)
    return (nib[0::2] << 4) | nib[1::2]


def unpack_int4(packed: Tensor, count: int) -> Tensor:
    """Inverse of pack_int4: the first `count` codes as int8."""
    hi = (packed >> 4).to(torch.int16)
    lo = (packed & 0xF).to(torch.int16)
    nib = torch.stack([hi, lo], dim=1).reshape(-1)[:count]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Signed `bits`-bit codes → a uint8 bit stream, `bits` bits per code, most significant bit first.

    Codes are stored offset by 2^(bits−1) (so they are unsigned); ceil(n · bits / 8) bytes for n codes.
    """
    offset = 1 << (bits - 1)
    u = q.reshape(-1).to(torch.int16) + offset
    if u.numel() and (u.min() < 0 or u.max() >= (1 << bits)):
        raise ValueError(f"pack_bits: codes must lie in [{-offset}, {offset - 1}]")
    as_bits = np.unpackbits(u.to(torch.uint8).numpy()[:, None], axis=1)[:, 8 - bits:]
    return torch.from_numpy(np.packbits(as_bits.reshape(-1)).copy())


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_bits: the first `count` codes as int8."""
    stream = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int16)
    u = (stream.astype(np.int16) * weights).sum(axis=1)
    return torch.from_numpy((u - (1 << (bits - 1))).astype(np.int8))
