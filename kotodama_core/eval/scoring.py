"""Batched log-likelihood of continuations and strided (sliding-window) scoring of long token streams."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.no_grad()
def continuation_logprobs(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], *,
                          max_length: int, batch_size: int, device: torch.device
                          ) -> list[tuple[float, bool]]:
    """For each (context, continuation) token pair: (Σ_t log p(cont_t | prefix), all argmax == cont_t).

    Each sequence is context + continuation with the last token dropped as input, left-truncated to
    `max_length` input tokens. Requests are sorted longest first so that a batch pads little and the
    first batch shows an out-of-memory at once; results come back in input order.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError("max_length and batch_size must be positive")
    prepared = []
    for idx, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"request {idx}: empty continuation")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        inp, n_cont = whole[:-1], min(len(cont), len(whole) - 1)
        if not inp:
            raise ValueError(f"request {idx}: no context token to condition on (pass a BOS/EOS prefix)")
        prepared.append((idx, inp, whole[-n_cont:]))
    order = sorted(prepared, key=lambda r: -len(r[1]))
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(batch[0][1])
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, inp, _) in enumerate(batch):
            ids[row, :len(inp)] = torch.tensor(inp)
        logits = model(ids.to(device))
        for row, (idx, inp, target) in enumerate(batch):
            n = len(target)
            logp = F.log_softmax(logits[row, len(inp) - n:len(inp)].float(), dim=-1)
            tgt = torch.tensor(target, device=logp.device)
            total = float(logp.gather(-1, tgt[:, None]).sum())
            greedy = bool((logp.argmax(-1) == tgt).all())
            out[idx] = (total, greedy)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Window:
    """Input tokens [start, end) of the stream; the last `scored` targets of the window are counted."""

    start: int
    end: int
    scored: int


def strided_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Windows for sliding-window perplexity of a stream of `n_tokens` tokens (token 0 is conditioning only).

    Window k has input tokens [max(0, e−max_length), e) predicting targets up to e, e = min(max_length +
    k·stride, n_tokens − 1) … each target is scored exactly once, and every target after the first window
    sees at least max_length − stride tokens of context.
    """
    if max_length < 1 or stride < 1:
        raise ValueError("max_length and stride must be positive")
    if stride > max_length:
        raise ValueError(f"stride ({stride}) must not exceed the window length ({max_length})")
    n_targets = n_tokens - 1
    if n_targets < 1:
        return []
    windows, done = [], 0
    end = min(max_length, n_targets)
    while True:
        windows.append(Window(max(0, end - max_length), end, end - done))
        done = end
        if end == n_targets:
            return windows
        end = min(end + stride, n_targets)


@torch.no_grad()
def strided_token_nll(model: torch.nn.Module, tokens: list[int] | torch.Tensor, *, max_length: int,
                      stride: int, device: torch.device, batch_size: int = 8) -> tuple[torch.Tensor, int]:
    """Per-target negative log-likelihood (nats) of tokens[1:], scored with strided windows.

    NLL_t = −ln p(x_t | x_{max(0, t−L)} … x_{t−1}) up to the window alignment; returns (nll (n−1,), n−1).
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    windows = strided_windows(ids.numel(), max_length, stride)
    nll = torch.empty(max(ids.numel() - 1, 0), dtype=torch.float64)
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        width = max(w.end - w.start for w in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for row, w in enumerate(group):
            batch[row, :w.end - w.start] = ids[w.start:w.end]
        logits = model(batch.to(device))
        for row, w in enumerate(group):
            length = w.end - w.start
            logp = F.log_softmax(logits[row, length - w.scored:length].float(), dim=-1)
            targets = ids[w.end - w.scored + 1:w.end + 1].to(logp.device)
            nll[w.end - w.scored:w.end] = -logp.gather(-1, targets[:, None])[:, 0].double().cpu()
    return nll, nll.numel()


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """bpb = Σ NLL (nats) / (ln 2 · bytes)."""
    if n_bytes <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return total_nll_nats / (math.log(2) * n_bytes)
