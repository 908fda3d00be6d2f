"""Read any checkpoint file without running pickled code: zstd or plain torch.save, weights_only=True.

The original's checkpoints hold loader states with numpy scalars (and may hold small numpy arrays);
those types are allow-listed (they rebuild data, never call code). Every failure is a CheckpointError of
one line naming the file and what is wrong.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from kotodama_core.model.io import ZSTD_MAGIC, CheckpointError, _decompress, numpy_safe_globals

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zipfile) serialization


def read_bytes(path: Path) -> tuple[bytes, bool]:
    """(torch.save bytes, was zstd-compressed). Raises CheckpointError for empty/foreign/corrupt files."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    if not raw:
        raise CheckpointError(f"{path}: file is empty")
    if raw.startswith(ZSTD_MAGIC):
        return _decompress(raw, path), True
    if raw.startswith(ZIP_MAGIC):
        return raw, False
    raise CheckpointError(f"{path}: not a checkpoint (first bytes {raw[:4].hex()}: neither a zstd stream nor a "
                          "torch.save zip archive)")


def safe_load(path: str | Path, map_location: Any = "cpu") -> tuple[Any, bool]:
    """(loaded object, was zstd-compressed), loaded with weights_only=True and the numpy allowlist."""
    path = Path(path)
    data, compressed = read_bytes(path)
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad payloads
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = "truncated or corrupt torch archive" if "zip" in first.lower() or "stream" in first.lower() \
            else "content cannot be loaded safely"
        raise CheckpointError(f"{path}: {what} ({type(exc).__name__}: {first[:200]})") from None
    return obj, compressed
