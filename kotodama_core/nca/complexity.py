"""gzip complexity of trajectories: the score that sorts rules into frozen, complex and noisy.

    gzip_ratio(b) = len(gzip_level9(b)) / len(b)

Low ratios are trajectories gzip can predict (fixed points, cycles); ratios near the entropy bound of
the byte encoding are noise. A rule's score is the mean ratio over its score grids, each grid's framed
patch-token stream written as little-endian uint16 or int32 bytes.
"""

from __future__ import annotations

import gzip
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kotodama_core.nca.tokenizer import encode_trajectories

_DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}


def gzip_ratio(data: bytes) -> float:
    """compressed / raw bytes under gzip level 9 (mtime fixed, so the result is deterministic)."""
    if not data:
        raise ValueError("gzip_ratio of empty data is undefined")
    return len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data)


def token_bytes(tokens: np.ndarray, dtype: str) -> bytes:
    if dtype not in _DTYPES:
        raise ValueError(f"score dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return np.ascontiguousarray(tokens, dtype=_DTYPES[dtype]).tobytes()


def score_trajectories(traj: torch.Tensor, *, states: int, patch: int, dtype: str,
                       workers: int = 1) -> np.ndarray:
    """(R, M, T, G, H, W) states -> (R,) mean over the M grids of gzip_ratio(token bytes)."""
    tokens = encode_trajectories(traj, states, patch).cpu().numpy()  # (R, M, L)
    streams = [token_bytes(tokens[r, m], dtype) for r in range(tokens.shape[0]) for m in range(tokens.shape[1])]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            ratios = list(pool.map(gzip_ratio, streams))
    else:
        ratios = [gzip_ratio(s) for s in streams]
    return np.asarray(ratios, dtype=np.float64).reshape(tokens.shape[0], tokens.shape[1]).mean(axis=1)


def in_band(scores: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """low < score < high, an open bound where None."""
    keep = np.ones_like(scores, dtype=bool)
    if low is not None:
        keep &= scores > low
    if high is not None:
        keep &= scores < high
    return keep
