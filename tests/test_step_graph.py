"""train.cuda_graph: the step replayed from one CUDA graph (kotodama_core/train/step_graph.py).

On the CPU: the rates held on the device train exactly as numbers do and leave checkpoints unchanged, and
a CPU run with the option says why it steps eagerly and trains as without it. On CUDA: the replayed step
trains as the eager one does, over a changing learning rate and gradient accumulation, and a capture that
fails loses no step."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kotodama_core.optim.hybrid import HybridOptimizer, build_optimizer
from kotodama_core.optim.muon import Muon

from .conftest import CONFIGS, tiny_train_overrides

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(device: str = "cpu", seed: int = 0) -> tuple[nn.Module, HybridOptimizer]:
    """A two-layer model with a Muon matrix group and a fused-AdamW rest, as the hybrid splits them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32, bias=True), nn.Linear(32, 8, bias=True)).to(device)
    matrices = [model[0].weight, model[1].weight]
    rest = [model[0].bias, model[1].bias]
    opt = HybridOptimizer({
        "muon": Muon([{"params": matrices, "name": "muon"}], lr=0.02, weight_decay=0.01),
        "adamw": torch.optim.AdamW([{"params": rest, "name": "adamw_no_decay", "weight_decay": 0.0}],
                                   lr=3e-3, fused=True)})
    return model, opt


def _train(model, opt, multipliers, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for mult in multipliers:
        opt.set_lr_multiplier(mult)
        x = torch.randn(4, 16, generator=gen).to(next(model.parameters()).device)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_rates_held_on_the_device_train_as_numbers_and_save_as_numbers():
    multipliers = [0.1, 0.5, 1.0, 0.7, 0.2]
    plain_model, plain = _pair()
    held_model, held = _pair()
    held.hold_lrs_on_device()
    assert isinstance(held.optimizers["adamw"].param_groups[0]["lr"], torch.Tensor)
    _train(plain_model, plain, multipliers)
    _train(held_model, held, multipliers)
    # The held rate is float32, what the fused CUDA kernel computes a number rate in; the CPU kernel keeps
    # a number in float64, hence a last-bit tolerance here.
    for a, b in zip(plain_model.parameters(), held_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(held.optimizers["adamw"].param_groups[0]["lr"]) == pytest.approx(3e-3 * 0.2)
    saved, saved_plain = held.state_dict(), plain.state_dict()
    group, group_plain = saved["adamw"]["param_groups"][0], saved_plain["adamw"]["param_groups"][0]
    assert group == group_plain, "a checkpoint must not depend on train.cuda_graph"
    assert isinstance(held.optimizers["adamw"].param_groups[0]["lr"], torch.Tensor), "saving left the live rate"
    # Loading (a number) into a held optimizer puts the rate back on the device, and training goes on alike.
    again_model, again = _pair()
    again.hold_lrs_on_device()
    again_model.load_state_dict(held_model.state_dict())
    again.load_state_dict(saved)
    assert isinstance(again.optimizers["adamw"].param_groups[0]["lr"], torch.Tensor)
    _train(again_model, again, [0.4, 0.9], seed=2)
    _train(plain_model, plain, [0.4, 0.9], seed=2)
    for a, b in zip(plain_model.parameters(), again_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rates_on_the_device_need_the_fused_adamw():
    model = nn.Linear(4, 4)
    opt = HybridOptimizer({"adamw": torch.optim.AdamW(model.parameters(), lr=1e-3)})
    with pytest.raises(ValueError, match="adamw optimizer is not the fused AdamW"):
        opt.hold_lrs_on_device()


def _engine_run(tmp_path, data, name: str, device: str, **extra) -> list[dict]:
    from kotodama_core.config import load_config
    from kotodama_core.train.distributed import DistInfo
    from kotodama_core.train.engine import train

    overrides = tiny_train_overrides(**{"train.steps": 6, "train.global_batch_tokens": 512,
                                        "train.checkpoint.every_steps": 3, **extra})
    cfg = load_config(CONFIGS / "presets/tiny.yaml", overrides)
    info = DistInfo(0, 1, 0, torch.device(device))
    train(cfg, data, tmp_path / name, info=info)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


def test_cuda_graph_on_the_cpu_says_why_and_trains_as_without(tmp_path, markov_data, capsys):
    eager = _losses(_engine_run(tmp_path, markov_data, "eager", "cpu"))
    asked = _losses(_engine_run(tmp_path, markov_data, "asked", "cpu", **{"train.cuda_graph": True}))
    assert "train.cuda_graph is on, but the run is on cpu" in capsys.readouterr().out
    assert asked == eager and len(eager) == 6


@cuda
@pytest.mark.parametrize("extra, captured_at", [
    ({"train.compile": False}, [1]),
    ({"train.compile": True, "train.compile_scope": "layers"}, [1]),
    # QAT from step 3 switches the forward: one eager step on the new key, a new capture at step 4
    ({"train.compile": False, "train.qat.enabled": True, "train.qat.start_fraction": 0.5}, [1, 4]),
], ids=["eager", "compiled_layers", "qat_switch"])
def test_replayed_step_trains_as_the_eager_step(tmp_path, markov_data, capsys, extra, captured_at):
    """Two micro-batches a step, the warm-up schedule changing the rate every step, a checkpoint at
    step 3: the graph (captured at step 1) must give the eager run's losses and gradient norms."""
    eager = _losses(_engine_run(tmp_path, markov_data, "eager", "cuda", **extra))
    graphed_records = _engine_run(tmp_path, markov_data, "graphed", "cuda", **{"train.cuda_graph": True, **extra})
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert [int(line.split("step ")[1].split(":")[0]) for line in out.splitlines()
            if "the step is captured in a CUDA graph" in line] == captured_at
    assert [r["step"] for r in graphed_records if "cuda_graph_capture_s" in r] == captured_at
    graphed = _losses(graphed_records)
    assert [s for s, *_ in graphed] == [s for s, *_ in eager]
    for (_, loss_e, norm_e), (_, loss_g, norm_g) in zip(eager, graphed):
        assert loss_g == pytest.approx(loss_e, rel=1e-4, abs=1e-5)
        assert norm_g == pytest.approx(norm_e, rel=1e-3, abs=1e-5)


@cuda
def test_a_failed_capture_loses_no_step(capsys):
    """A step that reads a value back to the host cannot be captured: the graph says so once, and that
    step and the later ones train eagerly, exactly as without the graph."""
    from kotodama_core.train.step_graph import StepGraph

    def runner(graphed: bool):
        model, opt = _pair("cuda")
        graph = StepGraph(opt, torch.device("cuda")) if graphed else None
        gen = torch.Generator().manual_seed(3)
        norms = []
        for step in range(4):
            opt.set_lr_multiplier(0.5 + 0.1 * step)
            batches = [torch.randn(4, 16, generator=gen)]

            def body(device_batches):
                loss = model(device_batches[0]).square().mean()
                loss.backward()
                if loss.item() < 0:  # a host read: not allowed while capturing
                    raise AssertionError("unreachable")
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach().reshape(1), norm

            if graph is None:
                out = body([b.cuda() for b in batches])
            else:
                out = graph.run("key", step, batches, body)
            norms.append(float(out[1]))
        return model, norms, graph

    eager_model, eager_norms, _ = runner(False)
    graphed_model, graphed_norms, graph = runner(True)
    assert graph.failed is not None and graph.graph is None
    assert "not permitted" in graph.failed or "capturing" in graph.failed, graph.failed  # the step's own error
    assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the capture's stream was left current"
    assert capsys.readouterr().out.count("capturing the step in a CUDA graph failed") == 1
    assert graphed_norms == pytest.approx(eager_norms, rel=1e-6)
    for a, b in zip(eager_model.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(a, b)


@cuda
def test_graph_replays_the_hybrid_optimizer_with_each_steps_rate():
    """The optimizer half on its own: Muon's device slots and AdamW's tensor rate are rewritten before
    each replay, so a schedule that changes every step trains as the eager optimizer does."""
    from kotodama_core.train.step_graph import StepGraph

    multipliers = [0.1, 0.3, 0.6, 1.0, 0.8, 0.4]
    eager_model, eager_opt = _pair("cuda")
    graphed_model, graphed_opt = _pair("cuda")
    graph = StepGraph(graphed_opt, torch.device("cuda"))
    gen = torch.Generator().manual_seed(4)
    for step, mult in enumerate(multipliers):
        batch = torch.randn(4, 16, generator=gen)
        for model, opt, use_graph in ((eager_model, eager_opt, False), (graphed_model, graphed_opt, True)):
            opt.set_lr_multiplier(mult)

            def body(device_batches, model=model, opt=opt):
                loss = model(device_batches[0]).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach().reshape(1), loss.detach()

            if use_graph:
                graph.run("key", step, [batch], body)
            else:
                body([batch.cuda()])
    assert graph.graph is not None and graph.failed is None and len(graph.captures) == 1
    for a, b in zip(eager_model.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_build_optimizer_then_hold_on_cpu_names_the_unfused_adamw():
    """The engine's own optimizer on the CPU is the unfused AdamW; the step graph never applies there
    (the engine says why first), and holding its rates is refused by name rather than half done."""
    from kotodama_core.config import load_config
    from kotodama_core.model import KotodamaLM

    cfg = load_config(CONFIGS / "presets/tiny.yaml", tiny_train_overrides())
    opt = build_optimizer(KotodamaLM(cfg.model), cfg.optim)
    with pytest.raises(ValueError, match="not the fused AdamW"):
        opt.hold_lrs_on_device()
    assert not opt.lrs_on_device
