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
        # Whole-list (foreach) kernels: at 196 matrices a per-parameter loop spends most of the step
        # launching small kernels, not computing.
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        buckets: dict[tuple[int, int], list[int]] = {}
        for j, p in enumerate(params):
            buckets.setdefault(tuple(p.shape), []).append(j)
        offset = 0
        for (rows, cols), members in buckets.items():
            stack = torch.stack([updates[j] for j in members])
            ortho = self._orthogonalize(stack, group, offset)
            offset += len(members)
            scale = math.sqrt(max(1.0, rows / cols))
            targets = [params[j] for j in members]
            torch._foreach_add_(targets, list(ortho.to(targets[0].dtype).unbind(0)), alpha=-lr * scale)

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
