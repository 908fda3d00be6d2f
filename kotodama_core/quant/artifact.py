"""The quantized model artifact: per-row integer codes packed tightly, one compressed file.

Layout before compression (all integers little-endian):
    b"KQNT" | u8 format version | u32 header length H | H bytes of UTF-8 JSON header | payload
The header lists every tensor of the state dict in order: name, shape, bits and where its bytes lie in
the payload. Quantized tensors (bits 4/5/6/8) hold packed codes followed by one fp16 scale per row;
float tensors (norm gains, AttnRes queries, scalars, bits=16) hold their raw fp16 or fp32 values. The
whole layout is then compressed with zstd (level 22 by default) or LZMA (preset 9 | extreme); the codec
is recognised from the file's magic bytes when loading.

Payload bytes of a rows×cols matrix at b bits: ceil(rows·cols·b / 8) for packed codes (`pack: bits`;
4-bit codes are always nibble-packed, two per byte), rows·cols for `pack: int8` containers (5/6 bits),
plus 2·rows for the scales.
"""

from __future__ import annotations

import json
import lzma
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import zstandard

from kotodama_core.errors import UserError
from kotodama_core.quant.config import QuantBits
from kotodama_core.quant.groups import FLOAT, bits_for
from kotodama_core.quant.rowwise import (dequantize_rows, pack_bits, pack_int4, quantize_rows, unpack_bits,
                                         unpack_int4)

MAGIC = b"KQNT"
VERSION = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
_FLOATS = {"fp16": torch.float16, "fp32": torch.float32}


class QuantArtifactError(UserError, ValueError):
    """A quantized artifact is unreadable or was written in an unknown layout."""


@dataclass
class PackedModel:
    """The serialized (uncompressed) layout plus byte accounting per bit width."""

    raw: bytes
    header: dict[str, Any]
    payload_bytes_by_bits: dict[int, int] = field(default_factory=dict)
    params_by_bits: dict[int, int] = field(default_factory=dict)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().numpy().tobytes()


def _pack_codes(q: torch.Tensor, bits: int, pack: str) -> tuple[bytes, str]:
    if bits == 4:
        return _tensor_bytes(pack_int4(q)), "nibble"
    if bits == 8 or pack == "int8":
        return _tensor_bytes(q.to(torch.int8)), "int8"
    return _tensor_bytes(pack_bits(q, bits)), "bits"


def pack_state_dict(state: Mapping[str, torch.Tensor], bits: QuantBits, *, pack: str = "bits",
                    float_dtype: str = "fp16", meta: Mapping[str, Any] | None = None) -> PackedModel:
    """Quantize a float state dict by `bits` and lay it out as bytes (uncompressed)."""
    chunks: list[bytes] = []
    entries = []
    offset = 0
    by_bits: dict[int, int] = {}
    params: dict[int, int] = {}
    for name, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise QuantArtifactError(f"{name}: only float tensors can be exported, got {tensor.dtype}")
        width = bits_for(name, tensor.ndim, bits)
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "bits": width, "offset": offset}
        if width == FLOAT:
            data = _tensor_bytes(tensor.detach().to(_FLOATS[float_dtype]))
            entry.update(kind="float", dtype=float_dtype, nbytes=len(data))
        else:
            q, scale = quantize_rows(tensor, width)
            codes, layout = _pack_codes(q, width, pack)
            data = codes + _tensor_bytes(scale)
            entry.update(kind="int", layout=layout, code_bytes=len(codes), nbytes=len(data))
        chunks.append(data)
        offset += len(data)
        by_bits[width] = by_bits.get(width, 0) + len(data)
        params[width] = params.get(width, 0) + tensor.numel()
        entries.append(entry)
    header = {"tensors": entries, "meta": dict(meta or {})}
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = MAGIC + struct.pack("<BI", VERSION, len(head)) + head + b"".join(chunks)
    return PackedModel(raw, header, by_bits, params)


def unpack_state_dict(raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(float32 state dict of the dequantized weights, meta) from an uncompressed layout."""
    if raw[:4] != MAGIC:
        raise QuantArtifactError(f"not a quantized Kotodama model (magic {raw[:4]!r}, expected {MAGIC!r})")
    version, hlen = struct.unpack("<BI", raw[4:9])
    if version != VERSION:
        raise QuantArtifactError(f"quantized layout version {version}; this code reads version {VERSION}")
    header = json.loads(raw[9:9 + hlen])
    payload = memoryview(raw)[9 + hlen:]
    state: dict[str, torch.Tensor] = {}
    for e in header["tensors"]:
        shape = tuple(e["shape"])
        numel = int(np.prod(shape, dtype=np.int64))
        blob = payload[e["offset"]:e["offset"] + e["nbytes"]]
        if e["kind"] == "float":
            arr = np.frombuffer(blob, dtype=np.float16 if e["dtype"] == "fp16" else np.float32)
            state[e["name"]] = torch.from_numpy(arr.copy()).reshape(shape).float()
            continue
        codes = torch.from_numpy(np.frombuffer(blob[:e["code_bytes"]], dtype=np.uint8).copy())
        scale = torch.from_numpy(np.frombuffer(blob[e["code_bytes"]:], dtype=np.float16).copy())
        if e["layout"] == "nibble":
            q = unpack_int4(codes, numel)
        elif e["layout"] == "bits":
            q = unpack_bits(codes, e["bits"], numel)
        else:
            q = codes.view(torch.int8)[:numel]
        state[e["name"]] = dequantize_rows(q.reshape(shape), scale)
    return state, header["meta"]


def compress(raw: bytes, codec: str, level: int | None = None) -> bytes:
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level or 22).compress(raw)
    if codec == "lzma":
        preset = 9 | lzma.PRESET_EXTREME if level is None else level
        return lzma.compress(raw, format=lzma.FORMAT_XZ, preset=preset)
    raise ValueError(f"unknown codec {codec!r}; choose 'zstd' or 'lzma'")


def decompress(blob: bytes) -> bytes:
    if blob.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 34)
    if blob.startswith(XZ_MAGIC):
        return lzma.decompress(blob)
    raise QuantArtifactError(f"unknown compression (first bytes {blob[:6].hex()}); expected zstd or xz")


def load_quantized(path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a compressed quantized artifact: (dequantized float32 state dict, meta)."""
    with open(path, "rb") as f:
        return unpack_state_dict(decompress(f.read()))


def load_quantized_model(path, device: str | torch.device = "cpu"):
    """The KotodamaLM of a quantized artifact, built from the model config stored in its meta."""
    from kotodama_core.model import KotodamaConfig, KotodamaLM

    state, meta = load_quantized(path)
    if "model" not in meta:
        raise QuantArtifactError(f"{path}: the artifact carries no model config")
    model = KotodamaLM(KotodamaConfig.model_validate(meta["model"]), device="meta")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model.rope.reset_buffers()
    return model.eval()
