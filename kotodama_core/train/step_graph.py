"""The training step replayed from one CUDA graph (train.cuda_graph).

An eager or regionally compiled step spends host time on every launch, guard and autograd node: about
3,000 kernels for proxy-108m, and the Python between compiled regions under `compile_scope: layers`, which
made that scope host-bound on a slow host (bench/RESULTS.md). Captured once, the whole step (forward and
backward of every micro-batch, clipping, the hybrid optimizer, zeroing the gradients) is one replay.

What a replay reads must stay where the capture found it:
- the micro-batches: copied before each replay into static tensors, one per micro-batch;
- the learning rates: held on the device (HybridOptimizer.hold_lrs_on_device) and rewritten by
  set_lr_multiplier before each replay;
- weights, optimizer states, RoPE tables: updated in place, never reallocated after the warm-up;
- gradients and activations: allocated inside the capture, from the graph's own memory pool.
What changes the step's Python path (the forward in use, QAT, the recurrence depth) is the graph's key:
a new key runs one eager warm-up step and captures again.

Capture order: the first step of a key runs eagerly on a side stream (compiles, lazy optimizer state,
cuBLAS workspaces), the second is captured and then replayed, so it trains like any other step; a capture
adds no step. A capture that fails is said once, with its reason, and the run goes on eagerly with the
same micro-batches: nothing is skipped or lost. One CUDA device only (DDP all-reduces are not captured).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

StepBody = Callable[[Sequence[Tensor]], tuple[Tensor, Tensor]]

# Eager steps of a key before its capture: the first compiles the forward and backward and creates every
# lazily built state (AdamW moments, Muon stacks, device rate slots), which a capture must find in place.
WARMUP_STEPS = 1


def step_graph_unavailable(device: torch.device, world_size: int) -> str | None:
    """Why train.cuda_graph cannot apply to this run, or None when it can."""
    if device.type != "cuda":
        return f"the run is on {device.type}, and CUDA graphs need a CUDA device"
    if world_size > 1:
        return f"the run has {world_size} ranks, and the step graph does not capture DDP's all-reduces"
    return None


class StepGraph:
    """Replays the training step from a CUDA graph captured after a warm-up step (module docstring).

    run(key, step, batches, body) trains step `step` on `batches` (CPU token tensors, one per micro-batch)
    and returns body's outputs ([loss, ce] means and the gradient norm) as fresh device tensors; `body` is
    the step itself, called on device batches, eagerly or under capture."""

    def __init__(self, optimizer: Any, device: torch.device) -> None:
        optimizer.hold_lrs_on_device()
        self.optimizer = optimizer
        self.device = device
        self.key: Hashable | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.inputs: list[Tensor] | None = None  # the static micro-batches, (batch, window) each
        self.outputs: tuple[Tensor, Tensor] | None = None
        self.failed: str | None = None          # why capturing failed; then every step runs eagerly
        self.captures: list[tuple[int, float]] = []  # (step, seconds) of each capture

    def run(self, key: Hashable, step: int, batches: Sequence[Tensor], body: StepBody) -> tuple[Tensor, Tensor]:
        if self.failed is not None:
            return body(self._on_device(batches))
        if key != self.key:
            self.key, self.graph, self.outputs, self.warm = key, None, None, 0
        if self.graph is None and self.warm < WARMUP_STEPS:
            self.warm += 1
            return self._warm_up(body, self._on_device(batches))
        views = self._load(batches)
        if self.graph is None:
            try:
                self._capture(body, views, step)
            except Exception as exc:  # the step is not lost: it runs eagerly below, and so do later ones
                self.graph, self.outputs = None, None
                # The aborted capture's backward left gradients that hold nothing (recorded, never run).
                self.optimizer.zero_grad(set_to_none=True)
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(f"[train] step {step}: capturing the step in a CUDA graph failed ({self.failed}); "
                      "train.cuda_graph is off for the rest of this run, which steps eagerly", flush=True)
                return body(views)
        self.graph.replay()
        mean, grad_norm = self.outputs
        return mean.clone(), grad_norm.clone()  # the next replay overwrites the graph's own outputs

    def _on_device(self, batches: Sequence[Tensor]) -> list[Tensor]:
        return [b.to(self.device, non_blocking=True) for b in batches]

    def _warm_up(self, body: StepBody, batches: list[Tensor]) -> tuple[Tensor, Tensor]:
        # On a side stream, as for any capture: what the warm-up initializes lazily is then not tied to
        # the stream the capture records.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        for batch in batches:  # made on this stream, read on the side one: not to be reused before that
            batch.record_stream(side)
        with torch.cuda.stream(side):
            out = body(batches)
        current.wait_stream(side)
        for tensor in out:  # made on the side stream, read on this one
            tensor.record_stream(current)
        return out

    def _load(self, batches: Sequence[Tensor]) -> list[Tensor]:
        """Copy the micro-batches into the static ones the graph reads. One allocation each, not slices of
        one tensor: a slice can start off the 16-byte alignment a fresh tensor has, and Inductor guards
        its kernels on that alignment, so the capture would recompile."""
        like = [(tuple(b.shape), b.dtype) for b in batches]
        held = None if self.inputs is None else [(tuple(t.shape), t.dtype) for t in self.inputs]
        if held != like:
            if self.graph is not None:
                raise RuntimeError(f"the captured step reads micro-batches {held}, this step brought {like}")
            self.inputs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in like]
        for slot, batch in zip(self.inputs, batches):
            slot.copy_(batch, non_blocking=True)
        return self.inputs

    def _capture(self, body: StepBody, views: list[Tensor], step: int) -> None:
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        cause: Exception | None = None
        stream = torch.cuda.current_stream(self.device)
        try:
            # thread_local: a CUDA call from another thread of this process (a loader or writer thread)
            # does not invalidate the capture; the backward's launches join the capturing stream all the same.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                try:
                    outputs = body(views)
                except Exception as exc:
                    cause = exc
                    raise
        except Exception as exc:
            # Ending a capture that the step broke raises its own error, before torch.cuda.graph leaves
            # its capture stream: go back to this stream, and report the step's error, which says what
            # broke the capture.
            torch.cuda.set_stream(stream)
            raise (cause or exc) from None
        self.graph, self.outputs = graph, outputs
        seconds = time.perf_counter() - t0
        self.captures.append((step, seconds))
        print(f"[train] step {step}: the step is captured in a CUDA graph ({seconds:.1f} s); later steps "
              "replay it", flush=True)
