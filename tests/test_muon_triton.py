"""The fused Muon passes (muon_triton) against Muon's PyTorch passes: weights and momentum after several
steps, with and without Nesterov and weight decay, for tall, wide and square matrices whose sizes are no
multiple of the kernels' blocks.

Runs on CUDA; without CUDA only under TRITON_INTERPRET=1 (Triton's CPU interpreter), as
tests/test_attnres_triton.py does.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from kotodama_core.optim import muon_triton
from kotodama_core.optim.muon import Muon

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(muon_triton.triton is None, reason="Triton is not installed"),
    pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA, or TRITON_INTERPRET=1 to run the kernels on the CPU"),
]
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(70, 33), (70, 33), (33, 70), (48, 48), (48, 48), (48, 48)]


def _weights(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) * 0.1).to(DEVICE, dtype)) for s in SHAPES]


def _run(fused: bool, dtype: torch.dtype, steps: int, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = _weights(dtype)
    opt = Muon(params, fused=fused, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, dtype)
        opt.step()
    return [p.detach().float().cpu() for p in params], [opt.state[p]["momentum_buffer"].float().cpu() for p in params]


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 0.01), (False, 0.0), (True, 0.0)])
def test_fused_passes_match_pytorch(nesterov, weight_decay):
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay)
    fused_w, fused_m = _run(True, torch.float32, 3, **kw)
    plain_w, plain_m = _run(False, torch.float32, 3, **kw)
    for a, b in zip(fused_m, plain_m):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # On CUDA Newton–Schulz runs in bf16, where the two normalizations round differently.
    tol = dict(rtol=0, atol=2e-3) if CUDA else dict(rtol=1e-5, atol=1e-5)
    for a, b, w0 in zip(fused_w, plain_w, _weights(torch.float32)):
        assert not torch.equal(a, w0.detach().float().cpu())  # the step moved every weight
        torch.testing.assert_close(a, b, **tol)


def test_fused_passes_keep_bf16_weights_bf16():
    fused_w, _ = _run(True, torch.bfloat16, 2, lr=0.02, weight_decay=0.01)
    plain_w, _ = _run(False, torch.bfloat16, 2, lr=0.02, weight_decay=0.01)
    for a, b in zip(fused_w, plain_w):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)


def test_unsupported_layouts_take_the_pytorch_passes():
    params = _weights(torch.float32)
    for p in params:
        p.grad = torch.randn_like(p)
    assert muon_triton.supported(params, [p.grad for p in params])
    params[0].grad = torch.randn(params[0].shape[1], params[0].shape[0], device=DEVICE).t()  # not contiguous
    assert not muon_triton.supported(params, [p.grad for p in params])
    assert not Muon(params, fused=True)._plan({"params": params}).fused


def test_tall_matrices_share_the_newton_schulz_batch_of_their_wide_twins():
    params = _weights(torch.float32)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Muon(params, fused=True)
    batches = opt._plan(opt.param_groups[0]).batches
    assert sorted(sorted(tuple(m[0].shape) for m in batch) for batch in batches) == [
        [(33, 70), (70, 33)], [(48, 48)]]
    assert not Muon(params, fused=False)._plan(opt.param_groups[0]).fused


def _graph_run(graph: bool, steps: int, reload_at: int | None = None):
    """Weights after `steps` steps on CUDA with fresh gradient tensors (new addresses) and a new lr every
    step; at reload_at the optimizer state goes through state_dict/load_state_dict (new momentum stacks)."""
    params = _weights(torch.float32)
    opt = Muon(params, lr=0.02, weight_decay=0.01, graph=graph)
    g = torch.Generator().manual_seed(3)
    captured = []
    for step in range(steps):
        keep = [p.grad for p in params]  # the old gradients stay alive, so the new ones get new addresses
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
        opt.param_groups[0]["lr"] = 0.02 * (1 - step / steps)
        if step == reload_at:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a resumed checkpoint would
        opt.step()
        captured.append(opt._graph is not None)
        del keep
    return [p.detach().cpu() for p in params], captured


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
def test_captured_step_follows_new_gradients_and_learning_rates():
    eager, never = _graph_run(False, 6)
    graphed, captured = _graph_run(True, 6)
    assert not any(never) and captured == [False, True, True, True, True, True]
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # new momentum stacks (a reload) make a new layout: one eager step, then a new capture
    reloaded, captured = _graph_run(True, 6, reload_at=3)
    assert captured == [False, True, True, False, True, True]
    for a, b in zip(reloaded, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _fused_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    from tests.test_optim import _problem
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        params, grads = _problem()
        opt = _run_fused_muon(params, grads)
        torch.save({"params": [p.detach() for p in params],
                    "buffers": [opt.state[p]["momentum_buffer"] for p in params]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_fused_muon(params, grads) -> Muon:
    opt = Muon(params, lr=0.05, weight_decay=0.01, ns_variant="gram", fused=True)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="gloo takes CPU tensors: interpreter only")
def test_fused_passes_under_two_gloo_processes_match_one(tmp_path):
    """Tall and wide matrices in one Newton–Schulz batch, its matrices split round-robin across two
    ranks: every rank ends with the single-process weights and the full momentum."""
    import torch.multiprocessing as mp

    from tests.test_optim import _free_port, _problem
    mp.spawn(_fused_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    params, grads = _problem()
    opt = _run_fused_muon(params, grads)
    assert opt._plan(opt.param_groups[0]).fused
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(result["params"], params):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
        for a, p in zip(result["buffers"], params):
            assert torch.equal(a, opt.state[p]["momentum_buffer"])
