"""Muon: momentum SGD whose update for each 2-D matrix is orthogonalized by Newton–Schulz.

For a matrix parameter W (rows × cols) with gradient g, per step:
    buf ← μ·buf + g
    u   ← g + μ·buf            (Nesterov; plain momentum uses u ← buf)
    O   ← NS(u)                 (≈ U·Vᵀ of u, see newton_schulz)
    W   ← W·(1 − lr·wd)         (decoupled weight decay)
    W   ← W − lr·sqrt(max(1, rows/cols))·O

Distributed (torch.distributed initialized with world size > 1): gradients are already averaged by DDP,
so every rank updates its momentum buffers identically and keeps them in full (a rank-0 checkpoint is
complete). Matrices of one shape are stacked; matrix j of the group's running count goes to rank
j mod world, each rank orthogonalizes only its own matrices in one batched call, and an all_gather
hands every rank the full set. Works with gloo and nccl.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from kotodama_core.optim import newton_schulz


def _world(process_group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group), dist.get_rank(process_group)
    return 1, 0


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.01, ns_steps: int = 5, ns_variant: str = "gram_ns",
                 process_group=None):
        if lr < 0:
            raise ValueError(f"Muon lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        newton_schulz.ns_coefficients(ns_variant, ns_steps)  # validates the name and step count
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_variant=ns_variant)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D matrices, got a parameter of shape {tuple(p.shape)}")
        self.process_group = process_group

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        buckets: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
        for p in params:
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            update = g.add(buf, alpha=mu) if group["nesterov"] else buf
            buckets.setdefault(tuple(p.shape), []).append((p, update))
        offset = 0
        for (rows, cols), items in buckets.items():
            stack = torch.stack([u for _, u in items])
            ortho = self._orthogonalize(stack, group, offset)
            offset += len(items)
            scale = math.sqrt(max(1.0, rows / cols))
            for (p, _), o in zip(items, ortho):
                p.mul_(1.0 - lr * wd)
                p.add_(o.to(p.dtype), alpha=-lr * scale)

    def _orthogonalize(self, stack: Tensor, group: dict, offset: int) -> Tensor:
        """NS of a (N, r, c) stack; under torch.distributed each rank does matrices (offset + j) % world."""
        variant, steps = group["ns_variant"], group["ns_steps"]
        world, rank = _world(self.process_group)
        if world == 1:
            return newton_schulz.orthogonalize(stack, variant, steps)
        n, r, c = stack.shape
        first = [(k - offset) % world for k in range(world)]
        counts = [len(range(first[k], n, world)) for k in range(world)]
        dtype = newton_schulz.ns_dtype(stack.device)
        send = torch.zeros(max(counts), r, c, dtype=dtype, device=stack.device)
        if counts[rank]:
            send[:counts[rank]] = newton_schulz.orthogonalize(stack[first[rank]::world], variant, steps)
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=self.process_group)
        out = torch.empty(n, r, c, dtype=dtype, device=stack.device)
        for k in range(world):
            out[first[k]::world] = received[k][:counts[k]]
        return out
