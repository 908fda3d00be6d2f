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
        "--batch", "2", "--seq", "64", "--window", "1", "--windows", "2", "--only", "project,no_attnres,optimizer",
        "--json-out", str(out)])
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
    # --json-out holds the same three measurements, appended as each finished.
    assert [json.loads(x)["name"] for x in out.read_text().splitlines()] == [
        "project_eager", "project_no_attnres_eager", "hybrid_optimizer_step"]


def test_unknown_measurement_is_named(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--anchor", "x.py", "--device", "cpu",
                                      "--only", "project,warp_speed"])
    with pytest.raises(SystemExit, match="warp_speed"):
        train_throughput.main()
