"""Count-initialized bigram logit head and the tanh logit softcap.

Position t predicts token t + 1 from the current token a = ids[t]; the head adds a row of a table B:
    logits_t ← logits_t + B[a],     then (when on) logits ← c · tanh(logits / c)    (c = 30 in the records)
B is initialized from corpus counts c_ab (a followed by b) with additive smoothing α over K ids:
    p(b|a) = (c_ab + α) / (Σ_b' c_ab' + α·K),    p(b) = (Σ_a' c_a'b + α) / (N + α·K)
    B[a, b] = clip(log p(b|a) − log p(b), −clip, +clip)                                 (clip = 4)
(N is the number of pairs; both marginals come from the same pair counts.)

Realisations. rank 0: B is a trainable V×V table (exact; the records' 1024-token vocabulary gives 1M
entries). rank r: B ≈ L·Rᵀ with L, R (V, r) trainable; `load_table` sets them from the truncated SVD
of the count table over a support of K frequent ids (rows and columns outside the support start at 0).
For the SmolLM2 vocabulary (49,152) an exact table would hold 2.4·10⁹ entries (9.7 GB in fp32), so the
golf preset names rank 64 over the 4,096 most frequent ids (6.3M parameters).
Until `load_table` is called the head adds nothing (B = 0: the dense table and L start at zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap · tanh(logits / cap): smooth, monotone, |result| < cap, ≈ identity for |logits| ≪ cap."""
    return cap * torch.tanh(logits / cap)


def top_token_ids(tokens: Tensor, k: int, vocab_size: int) -> Tensor:
    """The k most frequent ids of a token stream (ties broken by lower id), most frequent first."""
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)
    return order[:k]


def bigram_log_ratio_table(tokens: Tensor, vocab_size: int, smoothing: float = 0.25, clip: float = 4.0,
                           support: Tensor | None = None) -> Tensor:
    """The (K, K) float32 table clip(log p(b|a) − log p(b), ±clip) over `support` ids (default: all V).

    tokens: a 1-D stream or (rows, T) sequences; pairs are taken within rows only. Pairs with an id
    outside the support are dropped; row/column k of the result is the id support[k].
    """
    tokens = tokens.long()
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if support is None:
        support = torch.arange(vocab_size)
    k = support.numel()
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[support.long()] = torch.arange(k)
    a, b = index[tokens[:, :-1]].reshape(-1), index[tokens[:, 1:]].reshape(-1)
    keep = (a >= 0) & (b >= 0)
    counts = torch.bincount(a[keep] * k + b[keep], minlength=k * k).view(k, k).double()
    alpha = float(smoothing)
    log_cond = (counts + alpha).log() - (counts.sum(1, keepdim=True) + alpha * k).log()
    log_marg = (counts.sum(0) + alpha).log() - torch.log(counts.sum() + alpha * k)
    return (log_cond - log_marg).clamp(-clip, clip).float()


def bigram_bias(ids: Tensor, *weights: Tensor) -> Tensor:
    """ids (...) -> (..., V) rows of B: the dense table (one weight) or L[ids]·Rᵀ (two weights)."""
    if len(weights) == 1:
        return F.embedding(ids, weights[0])
    left, right = weights
    return F.linear(F.embedding(ids, left), right)


def _empty(shape, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device))  # filled by KotodamaLM.init_weights


class BigramLogitHead(nn.Module):
    def __init__(self, vocab_size: int, rank: int, device=None):
        super().__init__()
        self.vocab_size, self.rank = vocab_size, rank
        if rank == 0:
            self.table = _empty((vocab_size, vocab_size), device)
        else:
            self.left = _empty((vocab_size, rank), device)
            self.right = _empty((vocab_size, rank), device)

    def weights(self) -> tuple[Tensor, ...]:
        return (self.table,) if self.rank == 0 else (self.left, self.right)

    def forward(self, ids: Tensor) -> Tensor:
        return bigram_bias(ids, *self.weights())

    @torch.no_grad()
    def load_table(self, table: Tensor, support: Tensor | None = None) -> None:
        """Set B from a (K, K) table over `support` ids (default: all V); entries outside stay 0.

        The low-rank head keeps the best rank-r approximation U_r·S_r·V_rᵀ: L = U_r·√S_r, R = V_r·√S_r.
        """
        v = self.vocab_size
        support = torch.arange(v) if support is None else support.long()
        if table.shape != (support.numel(), support.numel()):
            raise ValueError(f"table shape {tuple(table.shape)} does not match {support.numel()} support ids")
        support = support.to(self.weights()[0].device)
        table = table.to(self.weights()[0].device, torch.float64)
        if self.rank == 0:
            full = torch.zeros(v, v, dtype=torch.float64, device=table.device)
            full[support.unsqueeze(1), support.unsqueeze(0)] = table
            self.table.copy_(full)
            return
        u, s, vh = torch.linalg.svd(table, full_matrices=False)
        r = min(self.rank, s.numel())
        root = s[:r].sqrt()
        self.left.zero_()
        self.right.zero_()
        self.left[support, :r] = (u[:, :r] * root).to(self.left.dtype)
        self.right[support, :r] = (vh[:r].T * root).to(self.right.dtype)
