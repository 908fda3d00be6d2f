"""`.pt.zst` checkpoints: a zstd-compressed `torch.save`, the format of the published Kotodama files.

Loading a published checkpoint is one call:
    state_dict = load_pt_zst("fc-base.pt.zst")            # weights_only, on the CPU
or, straight into a model with every key and shape checked:
    model = load_model("fc-base.pt.zst", KotodamaConfig())
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from kotodama_core.errors import UserError
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.model import KotodamaLM

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model; the message says which."""


def compression_threads() -> int:
    """zstd worker threads for a checkpoint: compression dominates a background write, and the frame it
    makes is the same format single- or multi-threaded (any zstd reader decompresses it)."""
    return max(0, min(4, (os.cpu_count() or 1) // 2))


def encode_pt_zst(obj: Any, level: int = 3) -> bytes:
    """torch.save(obj) compressed with zstd, content checksum on: the bytes of a `.pt.zst` file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=compression_threads())
    return compressor.compress(buf.getbuffer())


def save_pt_zst(obj: Any, path: str | Path, level: int = 3) -> Path:
    """torch.save(obj) compressed with zstd (with a content checksum), written atomically:
    a temporary file in the same folder is fsynced and then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(encode_pt_zst(obj, level), path)


def write_atomic(data: bytes, path: Path, check: Callable[[Path], Any] | None = None) -> Path:
    """`data` into a temporary file beside `path`, fsynced, checked by `check(tmp)` when given (raising
    stops the publication), then renamed over `path`; the rename is made durable too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a crash right after cannot undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    """The file name of this project's checkpoint after `step` updates: `step_XXXXXXX.pt.zst`."""
    return f"step_{step:07d}.pt.zst"


def numpy_safe_globals() -> list[Any]:
    """numpy types that torch.load(weights_only=True) may rebuild: scalars, dtypes, plain arrays."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: list[Any] = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    for name in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "complex128", "str_", "bytes_"):
        allowed.append(type(np.dtype(getattr(np, name))))
    return allowed


def _decompress(raw: bytes, path: Path) -> bytes:
    if not raw:
        raise CheckpointError(f"{path}: file is empty")
    if not raw.startswith(ZSTD_MAGIC):
        raise CheckpointError(f"{path}: not a zstd stream (first bytes {raw[:4].hex()}, expected "
                              f"{ZSTD_MAGIC.hex()})")
    out = []
    rest = raw
    while rest:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            out.append(dobj.decompress(rest))
        except zstandard.ZstdError as exc:
            raise CheckpointError(f"{path}: corrupt zstd stream ({exc})") from None
        if not dobj.eof:
            raise CheckpointError(f"{path}: truncated zstd stream (the frame is incomplete after "
                                  f"{len(raw)} bytes; the file was cut short)")
        rest = dobj.unused_data
    return b"".join(out)


def load_pt_zst(path: str | Path, weights_only: bool = True, map_location: Any = "cpu") -> Any:
    """Read a `.pt.zst` file: zstd-decompress, then torch.load(weights_only, map_location)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = _decompress(path.read_bytes(), path)
    try:
        if not weights_only:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(numpy_safe_globals()):  # loader states carry numpy scalars
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad payloads
        raise CheckpointError(f"{path}: decompressed, but the content is not a loadable torch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from None


def _as_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    # A training checkpoint keeps the weights under "model"; a published file is the state dict itself.
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def state_dict_mismatches(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Human-readable differences between a state dict and a model: missing, unexpected, shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = []
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unexpected):
            hint = " (keys carry a DDP 'module.' or torch.compile '_orig_mod.' prefix; save the unwrapped model)"
        problems.append(f"unexpected keys: {', '.join(unexpected)}{hint}")
    for k in expected:
        if k in got and got[k] != expected[k]:
            problems.append(f"{k}: checkpoint {got[k]} vs model {expected[k]}")
    return problems


def load_model(path: str | Path, cfg: KotodamaConfig, map_location: Any = "cpu") -> KotodamaLM:
    """Build KotodamaLM(cfg) on `map_location` and load a `.pt.zst` state dict into it, strictly."""
    path = Path(path)
    state_dict = _as_state_dict(load_pt_zst(path, weights_only=True, map_location=map_location), path)
    model = KotodamaLM(cfg, device="meta")
    problems = state_dict_mismatches(state_dict, model)
    if problems:
        raise CheckpointError(f"{path} does not fit the model config: " + "; ".join(problems))
    model = model.to_empty(device=map_location)  # RotaryEmbedding rebuilds its tables on the move
    model.load_state_dict(state_dict, strict=True)
    return model
