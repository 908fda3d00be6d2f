"""Which bit width a parameter gets, by name (see QuantBits)."""

from __future__ import annotations

import re

from kotodama_core.quant.config import QuantBits

# Prefix-agnostic, so DDP ("module.") and torch.compile ("_orig_mod.") wrappers do not matter.
GROUP_PATTERNS = (
    ("attn", re.compile(r"(?:^|\.)attn\.")),
    ("mlp", re.compile(r"(?:^|\.)ffn\.")),
    ("embed", re.compile(r"(?:^|\.)(?:embed_tokens|lm_head)\.")),
)
FLOAT = 16


def bits_for(name: str, ndim: int, bits: QuantBits) -> int:
    """Bits for tensor `name` of `ndim` dimensions; 16 means "stays float" (always so below 2-D)."""
    if ndim < 2:
        return FLOAT
    for pattern, width in bits.patterns.items():
        if re.search(pattern, name):
            return width
    for group, pattern in GROUP_PATTERNS:
        if pattern.search(name):
            return getattr(bits, group)
    return bits.default
