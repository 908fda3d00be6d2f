"""Config of quantization: bit widths by parameter group (shared by QAT and export) and the export section."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator, model_validator

from kotodama_core.eval.config import ValBpbConfig
from kotodama_core.schema import StrictModel

# 16 = keep the tensor as a float (fp16 or fp32 by export.float_dtype); no integer grid.
ALLOWED_BITS = (4, 5, 6, 8, 16)


class QuantBits(StrictModel):
    """Bits per weight by parameter name. Tensors with fewer than 2 dimensions (norm gains, AttnRes
    queries, learned scalars) are never quantized.

    Lookup order for a ≥2-D tensor named N: the first regex of `patterns` that re.search-es N, then the
    groups attn (`.attn.`), mlp (`.ffn.`), embed (`embed_tokens`, an untied `lm_head`), else `default`.
    """

    attn: int = 8
    mlp: int = 8
    embed: int = 8
    default: int = 8
    patterns: dict[str, int] = {}

    @field_validator("attn", "mlp", "embed", "default")
    @classmethod
    def _known_width(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {v}")
        return v

    @model_validator(mode="after")
    def _check_patterns(self) -> "QuantBits":
        for pattern, bits in self.patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bits.patterns: {pattern!r} is not a regex ({exc})") from None
            if bits not in ALLOWED_BITS:
                raise ValueError(f"bits.patterns[{pattern!r}] must be one of {ALLOWED_BITS}, got {bits}")
        return self


class QATConfig(StrictModel):
    """Straight-through quantization-aware training over the last (1 − start_fraction) of the steps."""

    enabled: bool = False
    start_fraction: float = 0.85
    bits: QuantBits = QuantBits()

    @model_validator(mode="after")
    def _check(self) -> "QATConfig":
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ValueError(f"train.qat.start_fraction must lie in [0, 1], got {self.start_fraction}")
        return self


class ExportConfig(StrictModel):
    """The export stage: quantize, pack, compress, check the byte budget, evaluate the dequantized model."""

    bits: QuantBits = QuantBits()
    # bits: 5/6-bit codes bit-packed (8 codes of 5 bits in 5 bytes, 4 of 6 bits in 3 bytes);
    # int8: 5/6-bit codes stored one per byte and left to the codec. 4-bit codes are always nibble-packed.
    pack: Literal["bits", "int8"] = "bits"
    codec: Literal["zstd", "lzma"] = "zstd"
    level: int | None = None                # zstd: 1..22 (None = 22); lzma: preset 0..9 (None = 9 | extreme)
    float_dtype: Literal["fp16", "fp32"] = "fp16"   # tensors that stay float (norms, scalars, bits=16)
    budget_bytes: int = 16_000_000
    enforce_budget: bool = True             # False: an over-budget artifact is written and flagged
    # Source files needed to load and run the artifact, relative to the repository root (globs).
    code_files: list[str] = ["kotodama_core/__init__.py", "kotodama_core/schema.py",
                             "kotodama_core/model/*.py", "kotodama_core/quant/*.py"]
    val_bpb: ValBpbConfig = ValBpbConfig()
    stride: int = 64
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ExportConfig":
        if self.level is not None:
            top = 22 if self.codec == "zstd" else 9
            if not (1 if self.codec == "zstd" else 0) <= self.level <= top:
                raise ValueError(f"export.level {self.level} is out of range for codec {self.codec}")
        if self.budget_bytes <= 0 or self.stride < 1:
            raise ValueError("export.budget_bytes and export.stride must be positive")
        return self
