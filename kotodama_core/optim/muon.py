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

On CUDA the element-wise passes are fused Triton kernels (muon_triton), a tall shape shares the batched
Newton–Schulz of the wide shape of its size, and on one device the whole step is captured once in a CUDA
graph and replayed, with the gradients' addresses and the learning rates refilled before each replay.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from kotodama_core.optim import muon_triton, newton_schulz
from kotodama_core.pointer_table import pointer_table


def _world(process_group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group), dist.get_rank(process_group)
    return 1, 0


@dataclass
class _Plan:
    """One param group's step: its matrices with gradients, by shape, and whether the fused passes serve
    it. `batches` are the Newton–Schulz calls: fused, a tall shape joins the wide shape of its size (its
    input written transposed); otherwise one per shape."""
    group: dict
    fused: bool
    batches: list[list[list[Tensor]]]


def _shape_views(batch: list[list[Tensor]], stack: Tensor, partial: Tensor | None = None):
    """Per shape of a Newton–Schulz batch: its matrices, their (n, rows, cols) view of the batch's (N, r, c)
    stack (transposed for a tall shape) and their rows of `partial`."""
    at = 0
    for members in batch:
        n = len(members)
        part = stack[at:at + n]
        yield members, (part.mT if members[0].shape[0] > members[0].shape[1] else part), (
            None if partial is None else partial[at:at + n])
        at += n


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.01, ns_steps: int = 5, ns_variant: str = "gram_ns",
                 process_group=None, fused: bool | None = None, graph: bool | None = None):
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
        # None: on one CUDA device with the fused passes, the step is captured once in a CUDA graph and
        # replayed (about 100 launches become one); False: never.
        self.graph = graph
        self._stacks: dict[tuple[int, ...], tuple[Tensor, list[Tensor]]] = {}
        self._lrs: Tensor | None = None         # each group's lr on the device, read by the apply pass
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._graph_grads: Tensor | None = None  # the captured step's gradient pointer table, refilled

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(group) for group in self.param_groups]
        if self._graphable(plans):
            self._graphed_step(plans)
        else:
            for index, plan in enumerate(plans):
                self._step_plan(index, plan)
        return loss

    def _plan(self, group: dict) -> _Plan:
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
        by_shape: dict[tuple[int, int], list[Tensor]] = {}
        for p in params:
            by_shape.setdefault(p.shape, []).append(p)
        fused = bool(params) and self._fused_for(params, grads)
        if not fused:
            return _Plan(group, False, [[members] for members in by_shape.values()])
        batches: dict[tuple[int, int], list[list[Tensor]]] = {}
        for (rows, cols), members in by_shape.items():
            batches.setdefault((min(rows, cols), max(rows, cols)), []).append(members)
        return _Plan(group, True, list(batches.values()))

    def _fused_for(self, params: list[Tensor], grads: list[Tensor]) -> bool:
        if self.fused is False or not muon_triton.supported(params, grads):
            return False
        return self.fused is True or params[0].is_cuda

    def _step_plan(self, index: int, plan: _Plan, grad_tables: Iterator[Tensor] | None = None) -> None:
        """One group's update; grad_tables (the captured step's) stand in for the gradients' own tables,
        and then the group's lr is already on the device."""
        if not plan.fused:
            offset = 0
            for (members,) in plan.batches:
                self._step_pytorch(plan.group, members, offset)
                offset += len(members)
            return
        group = plan.group
        device = group["params"][0].device
        if grad_tables is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self._lr_slots(device)[index].fill_(group["lr"])
        elif grad_tables is None and self._lrs is None:
            # Inside another owner's capture (the engine's step graph) a fill would freeze this step's
            # rate into the graph; that owner writes the slots before each replay (write_device_lrs).
            raise RuntimeError("Muon is being captured in a CUDA graph but its learning rates are not on the "
                               "device yet: call write_device_lrs() (HybridOptimizer.hold_lrs_on_device) "
                               "before capturing")
        lr = self._lrs[index:index + 1]
        offset = 0
        for batch in plan.batches:
            first = batch[0][0]
            r, c = min(first.shape), max(first.shape)
            count = sum(len(members) for members in batch)
            update = torch.empty(count, r, c, dtype=newton_schulz.ns_dtype(first.device), device=first.device)
            partial = torch.empty(count, muon_triton.tiles(r, c), dtype=torch.float32, device=first.device)
            for members, view, part in _shape_views(batch, update, partial):
                table = next(grad_tables) if grad_tables is not None else pointer_table([p.grad for p in members])
                muon_triton.momentum(table, members[0].grad.dtype, self._momentum_stack(members), view, part,
                                     group["momentum"], group["nesterov"])
            muon_triton.normalize(update, partial, newton_schulz.NORM_EPS)
            ortho = self._orthogonalize(update, group, offset, normalized=True)
            for members, view, _ in _shape_views(batch, ortho):
                rows, cols = members[0].shape
                muon_triton.apply_update(pointer_table(members), members[0].dtype, view, lr,
                                         group["weight_decay"], math.sqrt(max(1.0, rows / cols)))
            offset += count

    def write_device_lrs(self) -> None:
        """Copy each group's lr into the device slots the fused apply pass reads, as a step does first; for
        a step captured by someone else's CUDA graph, which reads the slots and does not fill them."""
        device = self.param_groups[0]["params"][0].device
        slots = self._lr_slots(device)
        for index, group in enumerate(self.param_groups):
            slots[index].fill_(group["lr"])

    def _lr_slots(self, device: torch.device) -> Tensor:
        if self._lrs is None or self._lrs.device != device or len(self._lrs) != len(self.param_groups):
            self._lrs = torch.zeros(len(self.param_groups), dtype=torch.float32, device=device)
        return self._lrs

    def _step_pytorch(self, group: dict, members: list[Tensor], offset: int) -> None:
        # Matrices of one shape are updated as one (N, rows, cols) stack: one kernel per operation and
        # shape instead of a (foreach) pass over 196 separate matrices, and the momentum buffers live in
        # that stack (each matrix's state entry is a view of it), so only the gradients are gathered.
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        rows, cols = members[0].shape
        buf = self._momentum_stack(members)
        grads = torch.stack([p.grad for p in members])
        torch.add(grads, buf, alpha=mu, out=buf)  # buf ← μ·buf + g
        if group["nesterov"]:  # u ← g + μ·buf, written straight in the Newton–Schulz dtype
            update = torch.empty(buf.shape, dtype=newton_schulz.ns_dtype(buf.device), device=buf.device)
            torch.add(grads, buf, alpha=mu, out=update)
        else:
            update = buf
        scale = math.sqrt(max(1.0, rows / cols))
        if wd:  # decay and update in one pass: lerp(W, −(scale/wd)·O, lr·wd) = W(1 − lr·wd) − lr·scale·O,
            # with −scale/wd applied inside Newton–Schulz's last product
            target = self._orthogonalize(update, group, offset, -scale / wd).to(members[0].dtype)
            torch._foreach_lerp_(members, list(target.unbind(0)), lr * wd)
        else:
            ortho = self._orthogonalize(update, group, offset)
            torch._foreach_add_(members, list(ortho.to(members[0].dtype).unbind(0)), alpha=-lr * scale)

    # -- the captured step ------------------------------------------------------------------------------

    def _graphable(self, plans: list[_Plan]) -> bool:
        if self.graph is False or not plans or not all(plan.fused for plan in plans):
            return False
        device = plans[0].group["params"][0].device
        return (device.type == "cuda" and _world(self.process_group)[0] == 1
                and not torch.cuda.is_current_stream_capturing())  # never inside someone else's capture

    def _layout(self, plans: list[_Plan]) -> tuple:
        """What a captured step depends on besides the gradients' addresses: the weights (by identity and
        address), the momentum stacks, the dtypes and every hyperparameter but the learning rate."""
        key = []
        for plan in plans:
            g = plan.group
            key.append((g["momentum"], g["nesterov"], g["weight_decay"], g["ns_variant"], g["ns_steps"]))
            for batch in plan.batches:
                for members in batch:
                    key.append((self._momentum_stack(members).data_ptr(), members[0].dtype, members[0].grad.dtype,
                                *(id(p) for p in members), *(p.data_ptr() for p in members)))
        return tuple(key)

    def _graphed_step(self, plans: list[_Plan]) -> None:
        """The first step of a layout runs eagerly, on a side stream, so that the capture after it finds
        every lazy initialization (kernels compiled, cuBLAS workspaces) done; the second is captured; from
        then on each step refills the gradient pointer table and the learning rates and replays."""
        layout = self._layout(plans)
        if layout != self._graph_key:
            self._graph, self._graph_key = None, layout
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for index, plan in enumerate(plans):
                    self._step_plan(index, plan)
            current.wait_stream(side)
            return
        buckets = [members for plan in plans for batch in plan.batches for members in batch]
        if self._graph is None:
            self._graph_grads = torch.empty(sum(len(m) for m in buckets), dtype=torch.int64,
                                            device=self._lrs.device)
            tables = self._graph_grads.split([len(m) for m in buckets])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                it = iter(tables)
                for index, plan in enumerate(plans):
                    self._step_plan(index, plan, grad_tables=it)
            self._graph = graph
        torch.cat([pointer_table([p.grad for p in members]) for members in buckets], out=self._graph_grads)
        for index, plan in enumerate(plans):
            self._lrs[index].fill_(plan.group["lr"])
        self._graph.replay()

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
