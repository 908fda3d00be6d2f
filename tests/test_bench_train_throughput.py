"""CPU checks of bench/train_throughput.py: the harness around the engine (the GPU numbers come from the
device), and the busy/span arithmetic of its profile summary."""

from __future__ import annotations

import json
import sys

import pytest

from bench import train_throughput
from bench.train_throughput import device_busy_and_span, device_kernels, kernel_family


def test_busy_is_the_union_of_kernel_intervals_and_span_covers_them():
    # Two overlapping kernels (0-4, 2-6), a gap, one kernel (10-11), one inside it (10.2-10.5).
    busy, span = device_busy_and_span([(10.0, 11.0), (0.0, 4.0), (2.0, 6.0), (10.2, 10.5)])
    assert busy == pytest.approx(7.0)
    assert span == pytest.approx(11.0)
    assert device_busy_and_span([]) == (0.0, 0.0)


def test_device_kernels_leave_out_annotations_and_host_events():
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=Interval(start, end))

    prof = SimpleNamespace(events=lambda: [
        event("Optimizer.step#Muon.step", 100, 400, annotation=True), event("gemm", 100, 150),
        event("foreach", 300, 400), event("aten::mm", 90, 160, device=DeviceType.CPU)])
    assert device_kernels(prof) == [("gemm", 100, 150), ("foreach", 300, 400)]


def test_kernel_families():
    assert kernel_family("_mix_forward_kernel") == "attnres_kernels"
    assert kernel_family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_family("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT") == "matmul"
    assert kernel_family("triton_red_fused_add_mul_0") == "generated"
    assert kernel_family("elementwise_kernel") == "other"


def test_project_and_optimizer_measurements_on_cpu(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results.jsonl"
    monkeypatch.setattr(sys, "argv", [
        "train_throughput.py", "--anchor", "unused.py", "--device", "cpu", "--no-compile", "--preset", "tiny",
        "--batch", "2", "--seq", "64", "--window", "1", "--windows", "2", "--only", "project,no_attnres,optimizer,recipe", "--accum", "2",
        "--jsonl-out", str(out), "--json-out", str(tmp_path / "results.json")])
    train_throughput.main()
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by_name = {r.get("name"): r for r in lines}
    for name in ("project_eager", "project_no_attnres_eager"):
        r = by_name[name]
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["tok_s"] > 0 and len(r["windows_ms"]) == 2, r
    assert by_name["hybrid_optimizer_step"]["muon_matrices"] > 0
    assert 0 < by_name["hybrid_optimizer_step"]["ms"]
    summary = lines[-1]["summary"]
    assert summary["attnres_cost"] == pytest.approx(
        1 - by_name["project_eager"]["tok_s"] / by_name["project_no_attnres_eager"]["tok_s"], abs=1e-3)
    # --jsonl-out holds the same three measurements, appended as each finished.
    assert [json.loads(x)["name"] for x in out.read_text().splitlines()] == [
        "project_eager", "project_no_attnres_eager", "hybrid_optimizer_step", "project_accum2_eager"]
    # recipe: two micro-batches per optimizer step, and tokens/s counts both
    recipe = by_name["project_accum2_eager"]
    assert recipe["accum"] == 2 and "error" not in recipe
    assert recipe["tok_s"] == pytest.approx(2 * 2 * 64 / (recipe["step_ms"] / 1e3), rel=0.01)
    opt = by_name["hybrid_optimizer_step"]
    assert all(opt[f"muon_{v}_ms"] > 0 for v in ("quintic", "gram_ns", "gram"))
    assert 0 < opt["host_ms"] and opt["muon_pytorch_passes_ms"] > 0 and opt["hybrid_pytorch_passes_ms"] > 0 and opt["muon_uncaptured_ms"] > 0
    assert opt["ns_gflop"] > 0 and opt["elementwise_gb"] > 0 and "ns_floor_ms_at_peak" not in opt  # no peak on CPU
    # --json-out: the headline, every key present, null where this run measured nothing
    head = json.loads((tmp_path / "results.json").read_text())
    assert tuple(head) == train_throughput.HEADLINE_KEYS
    assert head["device"].startswith("cpu (torch ")
    assert head["project_tokens_per_s"] == by_name["project_eager"]["tok_s"]
    assert head["attnres_cost_fraction"] == summary["attnres_cost"]
    assert head["optimizer_step_ms"] == opt["ms"]
    assert head["compile_s"] == by_name["project_eager"]["compile_s"] > 0
    assert head["checkpoint_stall_s"] is not None  # the run's final save
    assert head["ref_compile_tokens_per_s"] is None and head["ratio_vs_ref_compile"] is None
    assert head["stage_vs_bench_ratio"] is None and head["variants"] == {}


def test_headline_ratios_and_stage_rate(tmp_path):
    results = {"ref": {"tok_s": 400}, "project": {"tok_s": 300, "compile_s": 41.5, "checkpoint_stall_s": 0.2},
               "no_attnres": {"tok_s": 320}, "optimizer": {"ms": 2.5}, "bf16_mix": {"tok_s": 304},
               "fp32_mix": {"tok_s": 296, "compile_s": 38.0}, "fp8": {"error": "no torchao"},
               "graph": {"tok_s": 330, "compile_s": 40.0, "capture_s": 3.0}, "no_attnres_graph": {"tok_s": 340}}
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "tokens_per_s": 10}, {"step": 10, "tokens_per_s": 290},
            {"step": 20, "checkpoint_stall_s": 3.0}, {"step": 20, "tokens_per_s": 296},
            {"step": 30, "tokens_per_s": 280}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rate = train_throughput.steady_tokens_per_s(metrics, skip_steps=10)
    assert rate == 290
    head = train_throughput.headline(results, "dev", "2026-12-04", rate)
    assert head["ratio_vs_ref_compile"] == 0.75 and head["attnres_cost_fraction"] == 0.062
    assert head["stage_vs_bench_ratio"] == round(290 / 300, 3)
    assert (head["compile_s"], head["checkpoint_stall_s"], head["optimizer_step_ms"]) == (41.5, 0.2, 2.5)
    assert head["variants"] == {  # a failed fp8 is left out
        "bf16_mix": {"tokens_per_s": 304, "ratio_vs_ref_compile": 0.76, "attnres_cost_fraction": 0.05,
                     "compile_s": None, "capture_s": None},
        "fp32_mix": {"tokens_per_s": 296, "ratio_vs_ref_compile": 0.74, "attnres_cost_fraction": 0.075,
                     "compile_s": 38.0, "capture_s": None},
        # the graphed step's AttnRes cost is against the graphed AttnRes-off step: 1 − 330/340
        "graph": {"tokens_per_s": 330, "ratio_vs_ref_compile": 0.825, "attnres_cost_fraction": 0.029,
                  "compile_s": 40.0, "capture_s": 3.0},
        "no_attnres_graph": {"tokens_per_s": 340, "ratio_vs_ref_compile": 0.85, "attnres_cost_fraction": None,
                             "compile_s": None, "capture_s": None}}
    train_throughput.write_headline(tmp_path / "r.json", head)
    assert json.loads((tmp_path / "r.json").read_text()) == head


def test_unknown_measurement_is_named(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--anchor", "x.py", "--device", "cpu",
                                      "--only", "project,warp_speed"])
    with pytest.raises(SystemExit, match="warp_speed"):
        train_throughput.main()


def test_newton_schulz_flops_and_kernel_families():
    # 512×1408 (the proxy's MLP matrices), five steps: 2·5·(2·512²·1408 + 512³) FLOPs, either orientation
    expected = 2 * 5 * (2 * 512 * 512 * 1408 + 512 ** 3)
    assert train_throughput.newton_schulz_flops(512, 1408, 5) == train_throughput.newton_schulz_flops(1408, 512, 5) == expected
    kernels = [("ampere_bf16_s16816gemm", 0.0, 1500.0), ("multi_tensor_apply_kernel", 1500.0, 2000.0),
               ("ampere_bf16_s16816gemm", 2000.0, 2500.0), ("vectorized_elementwise_kernel", 2500.0, 2600.0)]
    assert train_throughput.kernel_ms_by_family(kernels) == {"matmul": 2.0, "foreach": 0.5, "other": 0.1}
    assert train_throughput.kernel_ms_by_family(kernels, steps=2) == {"matmul": 1.0, "foreach": 0.25, "other": 0.05}
    assert train_throughput.top_kernels_ms(kernels, 2) == {"ampere_bf16_s16816gemm": 2.0, "multi_tensor_apply_kernel": 0.5}
