"""Patch tokenizer: grids of d-state cells <-> patch tokens, and trajectories <-> framed token streams.

A p x p patch with cells c_0..c_{p*p-1} in row-major order becomes the token sum_i c_i * d**i, so
patch tokens are 0 .. d**(p*p) - 1. Frame delimiters follow: START = d**(p*p), END = d**(p*p) + 1, and
the vocabulary size is d**(p*p) + 2 (10,002 for d = 10, p = 2). A trajectory (T, G, H, W) is written
frame by frame, each channel its own frame: for t in T, for g in G: [START, patches of (t, g)..., END],
patches in row-major order over the (H/p, W/p) patch grid.
"""

from __future__ import annotations

import torch

from kotodama_core.errors import UserError


class TokenizerError(UserError, ValueError):
    """Grid and patch sizes disagree, or a token stream is not a sequence of well-formed frames."""


def vocab_size(states: int, patch: int) -> int:
    return states ** (patch * patch) + 2


def frame_tokens(states: int, patch: int) -> tuple[int, int]:
    """(START, END) token ids."""
    base = states ** (patch * patch)
    return base, base + 1


def _check_divisible(h: int, w: int, patch: int) -> None:
    if h % patch or w % patch:
        raise TokenizerError(f"grid {h}x{w} is not divisible by patch {patch}")


def patchify(grids: torch.Tensor, states: int, patch: int) -> torch.Tensor:
    """(..., H, W) cell states -> (..., H/p * W/p) int64 patch tokens."""
    *lead, h, w = grids.shape
    _check_divisible(h, w, patch)
    x = grids.to(torch.int64).reshape(*lead, h // patch, patch, w // patch, patch)
    x = x.movedim(-3, -2).reshape(*lead, (h // patch) * (w // patch), patch * patch)
    place = states ** torch.arange(patch * patch, dtype=torch.int64, device=grids.device)
    return (x * place).sum(-1)


def unpatchify(tokens: torch.Tensor, states: int, patch: int, height: int, width: int) -> torch.Tensor:
    """(..., H/p * W/p) patch tokens -> (..., H, W) int64 cell states (inverse of `patchify`)."""
    _check_divisible(height, width, patch)
    *lead, n = tokens.shape
    ph, pw = height // patch, width // patch
    if n != ph * pw:
        raise TokenizerError(f"{n} patch tokens cannot fill a {height}x{width} grid of {patch}x{patch} patches")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= states ** (patch * patch)):
        raise TokenizerError(f"patch tokens must lie in [0, {states ** (patch * patch)}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
    place = states ** torch.arange(patch * patch, dtype=torch.int64, device=tokens.device)
    cells = (tokens.to(torch.int64).unsqueeze(-1) // place) % states  # (..., n, p*p)
    cells = cells.reshape(*lead, ph, pw, patch, patch).movedim(-2, -3)
    return cells.reshape(*lead, height, width)


def encode_trajectories(traj: torch.Tensor, states: int, patch: int) -> torch.Tensor:
    """(..., T, G, H, W) states -> (..., T * G * (H*W/p**2 + 2)) int64 framed token stream."""
    start, end = frame_tokens(states, patch)
    tokens = patchify(traj, states, patch)  # (..., T, G, P)
    lead = tokens.shape[:-1]
    framed = torch.cat([torch.full((*lead, 1), start, dtype=torch.int64, device=tokens.device), tokens,
                        torch.full((*lead, 1), end, dtype=torch.int64, device=tokens.device)], dim=-1)
    return framed.reshape(*traj.shape[:-4], -1)


def decode_trajectory(stream: torch.Tensor, states: int, patch: int, channels: int, height: int,
                      width: int) -> torch.Tensor:
    """1-D framed token stream -> (T, G, H, W) states; the stream must hold whole frames."""
    start, end = frame_tokens(states, patch)
    frame = height * width // (patch * patch) + 2
    _check_divisible(height, width, patch)
    if stream.ndim != 1 or stream.numel() % (frame * channels):
        raise TokenizerError(f"a stream of {stream.numel()} tokens is not a whole number of time steps of "
                             f"{channels} frames x {frame} tokens")
    frames = stream.to(torch.int64).view(-1, frame)
    if not bool((frames[:, 0] == start).all() and (frames[:, -1] == end).all()):
        raise TokenizerError(f"every frame must open with START={start} and close with END={end}")
    grids = unpatchify(frames[:, 1:-1], states, patch, height, width)
    return grids.view(-1, channels, height, width)
