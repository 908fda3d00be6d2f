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

from kotodama_core.optim import muon_triton, newton_schulz


def _world(process_group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group), dist.get_rank(process_group)
    return 1, 0


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.01, ns_steps: int = 5, ns_variant: str = "gram_ns",
                 process_group=None, fused: bool | None = None):
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
        # None: the fused Triton passes (muon_triton) wherever they can serve (CUDA); False: the PyTorch
        # passes everywhere; True: the fused passes wherever Triton can run them (tests, interpreter).
        self.fused = fused
        self._stacks: dict[tuple[int, ...], tuple[Tensor, list[Tensor]]] = {}

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
        # Matrices of one shape are updated as one (N, rows, cols) stack: one kernel per operation and
        # shape instead of a (foreach) pass over 196 separate matrices, and the momentum buffers live in
        # that stack (each matrix's state entry is a view of it), so only the gradients are gathered.
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        buckets: dict[tuple[int, int], list[Tensor]] = {}
        for p in params:
            buckets.setdefault(tuple(p.shape), []).append(p)
        offset = 0
        for (rows, cols), members in buckets.items():
            buf = self._momentum_stack(members)
            scale = math.sqrt(max(1.0, rows / cols))
            if self._fused_for(members):
                update = muon_triton.momentum_normalized([p.grad for p in members], buf, mu, group["nesterov"],
                                                         newton_schulz.NORM_EPS, newton_schulz.ns_dtype(buf.device))
                ortho = self._orthogonalize(update, group, offset, normalized=True)
                muon_triton.apply_update(members, ortho, decay=1.0 - lr * wd, step=lr * scale)
                offset += len(members)
                continue
            grads = torch.stack([p.grad for p in members])
            torch.add(grads, buf, alpha=mu, out=buf)  # buf ← μ·buf + g
            if group["nesterov"]:  # u ← g + μ·buf, written straight in the Newton–Schulz dtype
                update = torch.empty(buf.shape, dtype=newton_schulz.ns_dtype(buf.device), device=buf.device)
                torch.add(grads, buf, alpha=mu, out=update)
            else:
                update = buf
            if wd:  # decay and update in one pass: lerp(W, −(scale/wd)·O, lr·wd) = W(1 − lr·wd) − lr·scale·O,
                # with −scale/wd applied inside Newton–Schulz's last product
                target = self._orthogonalize(update, group, offset, -scale / wd).to(members[0].dtype)
                torch._foreach_lerp_(members, list(target.unbind(0)), lr * wd)
            else:
                ortho = self._orthogonalize(update, group, offset)
                torch._foreach_add_(members, list(ortho.to(members[0].dtype).unbind(0)), alpha=-lr * scale)
            offset += len(members)

    def _fused_for(self, members: list[Tensor]) -> bool:
        if self.fused is False or not muon_triton.supported(members):
            return False
        return self.fused is True or members[0].is_cuda

    def _momentum_stack(self, members: list[Tensor]) -> Tensor:
        """The (N, rows, cols) momentum stack of one shape bucket; state[p]["momentum_buffer"] is its j-th
        view. Built on the first step, and rebuilt (copying the buffers in) whenever a state entry is no
        longer that view: after load_state_dict, or when a checkpoint converter set a buffer."""
        key = tuple(id(p) for p in members)
        cached = self._stacks.get(key)
        if cached is not None and all(self.state[p].get("momentum_buffer") is view
                                      for p, view in zip(members, cached[1])):
            return cached[0]
        stack = torch.stack([self.state[p]["momentum_buffer"] if "momentum_buffer" in self.state[p]
                             else torch.zeros_like(p.grad) for p in members])
        views = list(stack.unbind(0))
        for p, view in zip(members, views):
            self.state[p]["momentum_buffer"] = view
        self._stacks[key] = (stack, views)
        return stack

    def _orthogonalize(self, stack: Tensor, group: dict, offset: int, out_scale: float = 1.0,
                       normalized: bool = False) -> Tensor:
        """out_scale·NS of a (N, r, c) stack (each matrix already of unit norm if `normalized`); under
        torch.distributed each rank does matrices (offset + j) % world."""
        variant, steps = group["ns_variant"], group["ns_steps"]
        world, rank = _world(self.process_group)
        if world == 1:
            return newton_schulz.orthogonalize(stack, variant, steps, out_scale=out_scale, normalized=normalized)
        n, r, c = stack.shape
        first = [(k - offset) % world for k in range(world)]
        counts = [len(range(first[k], n, world)) for k in range(world)]
        dtype = newton_schulz.ns_dtype(stack.device)
        send = torch.zeros(max(counts), r, c, dtype=dtype, device=stack.device)
        if counts[rank]:
            send[:counts[rank]] = newton_schulz.orthogonalize(stack[first[rank]::world], variant, steps,
                                                              out_scale=out_scale, normalized=normalized)
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=self.process_group)
        out = torch.empty(n, r, c, dtype=dtype, device=stack.device)
        for k in range(world):
            out[first[k]::world] = received[k][:counts[k]]
        return out
