"""Newton–Schulz variants, Muon (single and 2-process gloo), the hybrid split and bit-exact resume."""

from __future__ import annotations

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kotodama_core.model import KotodamaConfig, KotodamaLM
from kotodama_core.optim import Muon, OptimConfig, build_optimizer, newton_schulz, orthogonalize
from kotodama_core.optim.newton_schulz import GRAM_NS_SCHEDULE, QUINTIC, ns_coefficients

# Measured on a random N(0,1) 512×1408 matrix in fp32 (test below): where 5 steps put the singular values.
BANDS = {"quintic": (0.68, 1.14), "gram_ns": (0.975, 1.035), "gram": (0.975, 1.035)}


@pytest.fixture(scope="module")
def gaussian_512x1408():
    return torch.randn(512, 1408, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def normalized_singular_values(gaussian_512x1408):
    G = gaussian_512x1408.double()
    return torch.linalg.svdvals(G) / torch.linalg.matrix_norm(G)


def predicted_singular_values(s0: torch.Tensor, coeffs) -> torch.Tensor:
    """NS acts on each singular value alone: σ ← aσ + bσ³ + cσ⁵ starting from σ/‖G‖_F (in fp64)."""
    s = s0
    for a, b, c in coeffs:
        s = a * s + b * s ** 3 + c * s ** 5
    return s


@pytest.mark.parametrize("variant", ["quintic", "gram_ns", "gram"])
def test_singular_values_land_in_the_promised_band(gaussian_512x1408, normalized_singular_values, variant):
    G = gaussian_512x1408
    X = orthogonalize(G, variant, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X.double())
    predicted = predicted_singular_values(normalized_singular_values, ns_coefficients(variant, 5))
    # the matrix iteration follows the scalar polynomial for every singular value
    torch.testing.assert_close(s.sort().values, predicted.sort().values, rtol=0, atol=2e-4)
    lo, hi = BANDS[variant]
    assert lo <= s.min().item() and s.max().item() <= hi, (s.min().item(), s.max().item())


def test_gram_newton_schulz_agrees_with_classic(gaussian_512x1408):
    """Same coefficients, two algorithms: relative Frobenius difference below 1e-5 in fp32."""
    G = gaussian_512x1408
    gram, classic = orthogonalize(G, "gram"), orthogonalize(G, "gram_ns")
    assert ((gram - classic).norm() / classic.norm()).item() < 1e-5
    # with the quintic coefficients too, on a tall and a low-rank matrix
    X0 = G[:256, :640] / torch.linalg.matrix_norm(G[:256, :640])
    coeffs = [QUINTIC] * 5
    a = newton_schulz._gram_iteration(X0, coeffs)
    b = newton_schulz._classic_iteration(X0, coeffs)
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    low = torch.randn(300, 8, generator=torch.Generator().manual_seed(1)) @ G[:8, :200]
    torch.testing.assert_close(orthogonalize(low, "gram"), orthogonalize(low, "gram_ns"), rtol=0, atol=1e-5)


def test_batched_and_transposed_inputs():
    g = torch.Generator().manual_seed(2)
    stack = torch.randn(3, 24, 40, generator=g)
    batched = orthogonalize(stack, "gram")
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(stack[i], "gram"), rtol=0, atol=1e-6)
    tall = torch.randn(40, 24, generator=g)
    torch.testing.assert_close(orthogonalize(tall, "quintic"), orthogonalize(tall.T, "quintic").T)
    with pytest.raises(ValueError, match="unknown Newton-Schulz variant"):
        orthogonalize(tall, "cubic")
    with pytest.raises(ValueError, match="rows, cols"):
        orthogonalize(torch.randn(4))
    assert ns_coefficients("gram_ns", 7)[5:] == [GRAM_NS_SCHEDULE[-1]] * 2


def test_muon_step_follows_the_formula():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(48, 16, generator=g)
    grads = [torch.randn(48, 16, generator=g) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.05, ns_variant="quintic")
    w, buf = w0.clone(), torch.zeros_like(w0)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        buf = 0.9 * buf + grad
        update = orthogonalize(grad + 0.9 * buf, "quintic")
        w = w * (1 - 0.1 * 0.05) - 0.1 * math.sqrt(48 / 16) * update
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


# ------------------------------------------------------------------ the stacked step against the plain one
def _reference_orthogonalize(G, variant, steps, eps=1e-7):
    """The plain-expression Newton–Schulz the batched version replaced (fp32, one matrix)."""
    coeffs = ns_coefficients(variant, steps)
    X = G.float()
    transposed = X.shape[-2] > X.shape[-1]
    X = X.mT if transposed else X
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    if variant == "gram":
        eye = torch.eye(X.shape[-2])
        A, Q = X @ X.mT, None
        for step, (a, b, c) in enumerate(coeffs, start=1):
            P = a * eye + b * A + c * (A @ A)
            Q = P if Q is None else P @ Q
            if step == len(coeffs):
                break
            if step in newton_schulz.GRAM_RESTARTS:
                X, Q = Q @ X, None
                A = X @ X.mT
            else:
                A = P @ A @ P
                A = 0.5 * (A + A.mT)
        X = X if Q is None else Q @ X
    else:
        for a, b, c in coeffs:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


def _reference_muon(weights, grads_per_step, lr, mu, nesterov, wd, variant, steps):
    """Muon's formula matrix by matrix: buf ← μ·buf + g; u ← g + μ·buf (or buf); W ← W(1 − lr·wd) −
    lr·sqrt(max(1, rows/cols))·NS(u)."""
    ws = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            bufs[i] = mu * bufs[i] + g
            u = g + mu * bufs[i] if nesterov else bufs[i]
            rows, cols = ws[i].shape
            ws[i] = ws[i] * (1 - lr * wd) - lr * math.sqrt(max(1.0, rows / cols)) * _reference_orthogonalize(
                u, variant, steps)
    return ws, bufs


MIXED_SHAPES = [(24, 40), (40, 24), (24, 40), (16, 16), (40, 24), (24, 40)]


@pytest.mark.parametrize("variant,steps,nesterov,wd", [
    ("quintic", 5, True, 0.01), ("gram_ns", 5, True, 0.01), ("gram", 5, True, 0.01),
    ("gram_ns", 7, False, 0.0), ("gram", 3, False, 0.05), ("quintic", 2, True, 0.0)])
def test_stacked_muon_matches_the_per_matrix_formula(variant, steps, nesterov, wd):
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(s, generator=g) for s in MIXED_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in MIXED_SHAPES] for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon(params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=wd, ns_variant=variant,
               ns_steps=steps)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
    ws, bufs = _reference_muon(weights, grads, 0.05, 0.9, nesterov, wd, variant, steps)
    for p, w, b in zip(params, ws, bufs):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=2e-5)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=1e-6)


def test_every_coefficient_schedule_matches_the_plain_iteration():
    """Each variant and step count (the schedule's repeated last entry included): the fused-epilogue
    iteration equals the plain expressions on a wide, a tall and a stacked input."""
    g = torch.Generator().manual_seed(12)
    inputs = [torch.randn(32, 72, generator=g), torch.randn(72, 32, generator=g)]
    stack = torch.randn(4, 20, 36, generator=g)
    for variant in newton_schulz.VARIANTS:
        for steps in (1, 2, 5, 8):
            for G in inputs:
                torch.testing.assert_close(orthogonalize(G, variant, steps),
                                           _reference_orthogonalize(G, variant, steps), rtol=0, atol=2e-5)
                # a scale applied inside the last product equals scaling the result
                torch.testing.assert_close(orthogonalize(G, variant, steps, out_scale=-37.5),
                                           -37.5 * orthogonalize(G, variant, steps), rtol=1e-5, atol=1e-5)
            batched = orthogonalize(stack, variant, steps)
            for i in range(4):
                torch.testing.assert_close(batched[i], _reference_orthogonalize(stack[i], variant, steps),
                                           rtol=0, atol=2e-5)


def test_momentum_buffers_are_views_of_the_stack_and_replaced_buffers_are_taken_in():
    """Each matrix's momentum_buffer is a view of its shape's stack (one kernel updates them all); a
    buffer replaced from outside (load_state_dict, a checkpoint converter) is copied into a new stack."""
    g = torch.Generator().manual_seed(13)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in MIXED_SHAPES]
    opt = Muon(params, lr=0.05, momentum=0.9, ns_variant="gram_ns")
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    assert bufs[0].untyped_storage().data_ptr() == bufs[2].untyped_storage().data_ptr()
    assert bufs[1].untyped_storage().data_ptr() != bufs[0].untyped_storage().data_ptr()
    planted = torch.randn(MIXED_SHAPES[2], generator=g)
    opt.state[params[2]]["momentum_buffer"] = planted.clone()
    grad = torch.randn(MIXED_SHAPES[2], generator=g)
    for p in params:
        p.grad = grad.clone() if p is params[2] else torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(opt.state[params[2]]["momentum_buffer"], 0.9 * planted + grad)
    torch.testing.assert_close(opt.state[params[0]]["momentum_buffer"], 0.9 * bufs[0])
    # a round trip through state_dict/load_state_dict keeps the step the same as without it
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Muon(twin, lr=0.05, momentum=0.9, ns_variant="gram_ns")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a checkpoint: no shared tensors
    for p, q in zip(params, twin):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, twin):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


def tiny_model() -> KotodamaLM:
    cfg = KotodamaConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                         intermediate_size=48, vocab_size=97, max_position_embeddings=64,
                         attn_res_boundaries=[0, 1])
    return KotodamaLM(cfg)


def test_hybrid_split_puts_exactly_the_hidden_matrices_in_muon():
    torch.manual_seed(4)
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    expected = {f"layers.{i}.{m}.weight" for i in range(2) for m in
                ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")}
    assert muon == expected
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.optimizers["adamw"].param_groups}
    assert by_group["adamw_decay"] == {"embed_tokens.weight"}
    assert by_group["adamw_no_decay"] == set(names.values()) - expected - {"embed_tokens.weight"}
    assert {n for n in by_group["adamw_no_decay"] if "res_query" in n} == \
        {"layers.0.attn_res_query", "layers.0.mlp_res_query", "layers.1.attn_res_query",
         "layers.1.mlp_res_query", "final_res_query"}
    groups = {g["name"]: g for g in opt.param_groups}
    assert (groups["muon"]["lr"], groups["muon"]["momentum"], groups["muon"]["weight_decay"]) == (0.02, 0.95, 0.01)
    assert groups["muon"]["nesterov"] and groups["muon"]["ns_steps"] == 5
    assert (groups["adamw_decay"]["lr"], groups["adamw_decay"]["betas"]) == (6e-4, (0.9, 0.95))
    assert groups["adamw_decay"]["weight_decay"] == 0.1 and groups["adamw_no_decay"]["weight_decay"] == 0.0
    opt.set_lr_multiplier(0.5)
    assert groups["muon"]["lr"] == 0.01 and groups["adamw_no_decay"]["lr"] == 3e-4
    # the all-AdamW baseline
    base = build_optimizer(model, OptimConfig(kind="adamw", adamw={"lr": 8e-4}))
    assert list(base.optimizers) == ["adamw"]
    assert sum(p.numel() for g in base.param_groups for p in g["params"]) == model.num_parameters()
    assert {g["name"]: g["lr"] for g in base.param_groups} == {"adamw_decay": 8e-4, "adamw_no_decay": 8e-4}


def _train(model, opt, batches):
    losses = []
    for ids in batches:
        loss, _ = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["hybrid", "adamw"])
def test_optimizer_state_resume_is_bit_exact(tmp_path, kind):
    from kotodama_core.model import load_pt_zst, save_pt_zst

    batches = [torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    cfg = OptimConfig(kind=kind)
    torch.manual_seed(5)
    straight = tiny_model()
    opt = build_optimizer(straight, cfg)
    losses = _train(straight, opt, batches)

    torch.manual_seed(5)
    first = tiny_model()
    opt1 = build_optimizer(first, cfg)
    head = _train(first, opt1, batches[:3])
    save_pt_zst({"model": first.state_dict(), "optim": opt1.state_dict()}, tmp_path / "ck.pt.zst")
    ck = load_pt_zst(tmp_path / "ck.pt.zst")
    torch.manual_seed(99)  # the resumed run starts from different random weights, then loads
    resumed = tiny_model()
    resumed.load_state_dict(ck["model"])
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(ck["optim"])
    tail = _train(resumed, opt2, batches[3:])
    assert head + tail == losses
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="another optim.kind"):
        opt2.load_state_dict({"other": {}})


# ------------------------------------------------------------------ distributed Muon (2 gloo processes)
SHAPES = [(16, 40)] * 3 + [(40, 16)] * 2 + [(8, 8)]  # buckets of 3, 2 and 1 matrices


def _problem():
    g = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(2)]
    return params, grads


def _run_muon(params, grads):
    opt = Muon(params, lr=0.05, weight_decay=0.01, ns_variant="gram")
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return opt


def _worker(rank: int, world: int, port: int, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        counted = []
        original = newton_schulz.orthogonalize

        def counting(G, *args, **kwargs):
            counted.append(G.shape[0])
            return original(G, *args, **kwargs)

        newton_schulz.orthogonalize = counting
        params, grads = _problem()
        opt = _run_muon(params, grads)
        torch.save({"params": [p.detach() for p in params], "counted": counted,
                    "buffers": [opt.state[p]["momentum_buffer"] for p in params]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_muon_matches_single_process_and_splits_the_work(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    params, grads = _problem()
    opt = _run_muon(params, grads)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        for a, b in zip(res["params"], params):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
        for a, p in zip(res["buffers"], params):  # momentum stays complete on every rank
            assert torch.equal(a, opt.state[p]["momentum_buffer"])
    # 6 matrices per step, round-robin across ranks (offset carries over buckets): each rank does 3
    per_rank = [sum(r["counted"]) for r in results]
    assert per_rank == [6, 6] and sum(per_rank) == len(SHAPES) * len(grads)
    assert results[0]["counted"] == [2, 1, 2, 1] and results[1]["counted"] == [1, 1, 1, 1, 1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_muon_step_on_cuda_matches_fp32_and_replays_from_a_cuda_graph():
    """bf16 Newton–Schulz on CUDA stays within bf16 rounding of the fp32 CPU step, and the step captured
    in a CUDA graph (grads refilled in place between replays) equals the eager step."""
    g = torch.Generator().manual_seed(14)
    shapes = [(64, 160), (160, 64), (64, 160), (32, 64)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]

    def make(device):
        ps = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
        return ps, Muon(ps, lr=0.02, momentum=0.95, weight_decay=0.01, ns_variant="gram_ns")

    cpu, opt_cpu = make("cpu")
    eager, opt_eager = make("cuda")
    graphed, opt_graphed = make("cuda")
    for p, gr in zip(graphed, grads[0]):
        p.grad = gr.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # step 1 eagerly (allocates the momentum stacks), outside the graph
        opt_graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graphed.step()
    # the capture did not run the step: put step 1's state back by replaying from the same start
    for p, w in zip(graphed, weights):
        p.data.copy_(w.cuda())
    for p in graphed:
        opt_graphed.state[p]["momentum_buffer"].zero_()
    for step_grads in grads:
        for ps in (cpu, eager):
            for p, gr in zip(ps, step_grads):
                p.grad = gr.clone().to(p.device)
        opt_cpu.step()
        opt_eager.step()
        for p, gr in zip(graphed, step_grads):
            p.grad.copy_(gr.cuda())
        graph.replay()
    for a, b, c in zip(cpu, eager, graphed):
        scale = a.detach().norm()
        assert ((b.detach().cpu() - a.detach()).norm() / scale).item() < 1e-2
        torch.testing.assert_close(c.detach(), b.detach(), rtol=0, atol=1e-6)
