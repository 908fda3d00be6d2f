"""Counter-based random numbers: a value is a pure function of its keys (rule, grid, step, cell).

A trajectory therefore does not depend on which other rules share its batch, on the batch order or on
the device: a rule reproduces alone. The mixer is a 32-bit integer hash evaluated in int64 so that every
product stays below 2**63 (both multipliers are odd and below 2**31), which keeps the arithmetic exact
on CPU and CUDA alike.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MUL_A = 0x7FEB352D
_MUL_B = 0x6B43A9B5


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche a tensor of int64 values in [0, 2**32) into a hash in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


def combine(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Hash of the pair (key, value); broadcasts like `key ^ value`."""
    if isinstance(value, int):
        value = torch.tensor(value, dtype=torch.int64, device=key.device)
    return mix32(key ^ mix32(value + 0x9E3779B9))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """float32 in the open interval (0, 1): (top 24 bits of h + 0.5) / 2**24."""
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def key_tensor(values, device: torch.device | str) -> torch.Tensor:
    """Seeds or indices as an int64 key tensor reduced to 32 bits."""
    return torch.as_tensor(values, dtype=torch.int64, device=device) & _MASK32
