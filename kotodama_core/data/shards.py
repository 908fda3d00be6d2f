"""Arrow IPC shards of fixed-length token windows, shared by the text and NCA data paths.

A shard is an Arrow IPC *file* with one column `tokens` of type fixed_size_list<uint16|uint32>[window]
(window = seq_len + 1). Readers memory-map it and view the tokens as a (rows, window) numpy array
without copying.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

TOKENS = "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: str | Path, windows: np.ndarray) -> int:
    """Write a (rows, window) integer array as a shard, atomically; returns bytes written."""
    windows = np.ascontiguousarray(windows)
    if windows.ndim != 2 or windows.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"windows must be a 2-D uint16/uint32 array, got {windows.dtype} {windows.shape}")
    rows, width = windows.shape
    flat = pa.array(windows.reshape(-1), type=pa.from_numpy_dtype(windows.dtype))
    column = pa.FixedSizeListArray.from_arrays(flat, width)
    table = pa.table({TOKENS: column})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return path.stat().st_size


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard and return its windows as a read-only (rows, window) array (no copy)."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    column = table.column(TOKENS).combine_chunks()
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=True)
    return values.reshape(-1, width)
