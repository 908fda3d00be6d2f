"""Device pointer tables for Triton kernels that read or write a list of separate tensors.

A kernel that serves many tensors in one launch (the AttnRes reads, Muon's per-matrix passes) takes an
int64 tensor of their addresses and casts an entry to a pointer; this module builds such tables on the
tensors' device, by one tiny launch (no host copy, no pinned memory, no sync), and keeps recent ones.
Without Triton (the CPU-only install) `pointer_table` raises; callers check `triton is not None` first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Pointer tables by (device, addresses). A table's content is exactly its key, so a hit is always right
# whatever now lives at those addresses; the caching allocator hands a training step the same buffers
# every step, so after the first step every call is a hit (no launch, no copy).
TABLES: "OrderedDict[tuple[int, ...], Tensor]" = OrderedDict()
TABLE_CACHE_SIZE = 256

if triton is not None:

    @triton.jit
    def _addresses_kernel(TENSORS, TABLE, K: tl.constexpr):
        """TABLE[k] = address of TENSORS[k]: the pointer table written on the device, by one tiny launch."""
        for k in tl.static_range(K):
            tl.store(TABLE + k, TENSORS[k].to(tl.int64))


def pointer_table(tensors: list[Tensor]) -> Tensor:
    """The tensors' addresses as an int64 tensor on their device, built there, so a CUDA graph can
    capture the calls that use it. Inside a capture the table is built fresh from the graph's own pool
    and not cached: a cached table could be evicted (freed) while the graph still reads it, and one
    written by a captured launch holds nothing until the graph is replayed."""
    if triton is None:
        raise RuntimeError("pointer tables need Triton, which this install lacks (the CPU-only install)")
    device = tensors[0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device.index if device.index is not None else -1, *(t.data_ptr() for t in tensors))
    if not capturing:
        table = TABLES.get(key)
        if table is not None:
            TABLES.move_to_end(key)
            return table
    table = torch.empty(len(tensors), dtype=torch.int64, device=device)
    _addresses_kernel[(1,)](tuple(tensors), table, K=len(tensors))
    if not capturing:
        TABLES[key] = table
        while len(TABLES) > TABLE_CACHE_SIZE:
            TABLES.popitem(last=False)
    return table
