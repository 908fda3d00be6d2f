"""Trajectory windows: simulate bank rules, tokenize, and cut each rule's stream into training windows.

Pass j simulates grid ids [j*M, (j+1)*M) of every rule (M = grids_per_batch; round robin over the
rules, `rules_per_batch` at a time), so the first pass already covers every rule. Each trajectory's framed token stream is cut into
consecutive windows of seq_len + 1 tokens; a window never mixes two rules, and the tail shorter than a
window is dropped (counted in `dropped_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from kotodama_core.nca.config import NCAConfig
from kotodama_core.nca.rules import Rule
from kotodama_core.nca.simulate import simulate
from kotodama_core.nca.tokenizer import encode_trajectories


def pack_windows(streams: np.ndarray, window: int) -> np.ndarray:
    """(N, L) token streams -> (N * (L // window), window) windows; each stream's tail is dropped."""
    n, length = streams.shape
    per = length // window
    return np.ascontiguousarray(streams[:, : per * window]).reshape(n * per, window)


@dataclass
class WindowCounts:
    trajectories: int = 0
    windows: int = 0
    dropped_tokens: int = 0
    rules_used: set[int] = field(default_factory=set)


def trajectory_windows(rules: Sequence[Rule], cfg: NCAConfig, *, stream: int, target_tokens: int,
                       dtype: np.dtype, device: torch.device | str,
                       counts: WindowCounts | None = None) -> Iterator[np.ndarray]:
    """Yield (rows, seq_len + 1) arrays until at least `target_tokens` tokens have been yielded."""
    window = cfg.data.seq_len + 1
    per_traj = cfg.steps * cfg.channels * ((cfg.grid // cfg.patch) ** 2 + 2)
    if per_traj < window:
        raise ValueError(f"a trajectory of {cfg.steps} steps holds {per_traj} tokens, fewer than one window of "
                         f"seq_len + 1 = {window}; raise nca.steps or lower nca.data.seq_len")
    counts = counts if counts is not None else WindowCounts()
    produced, first_grid, grids = 0, 0, cfg.data.grids_per_batch
    while produced < target_tokens:
        for lo in range(0, len(rules), cfg.data.rules_per_batch):
            batch = rules[lo: lo + cfg.data.rules_per_batch]
            traj = simulate(batch, range(first_grid, first_grid + grids), size=cfg.grid, states=cfg.states,
                            channels=cfg.channels, steps=cfg.steps, burn_in=cfg.burn_in, stream=stream,
                            device=device)
            tokens = encode_trajectories(traj, cfg.states, cfg.patch).flatten(0, 1)  # (R * M, L)
            windows = pack_windows(tokens.cpu().numpy().astype(dtype), window)
            need = -(-(target_tokens - produced) // window)
            windows = windows[:need]
            counts.trajectories += len(batch) * grids
            counts.windows += len(windows)
            counts.dropped_tokens += len(batch) * grids * (per_traj % window)
            counts.rules_used.update(r.spec.index for r in batch)
            produced += windows.size
            yield windows
            if produced >= target_tokens:
                return
        first_grid += grids
