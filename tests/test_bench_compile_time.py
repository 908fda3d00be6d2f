"""CPU check of bench/compile_time.py: every compile scope takes its first step on the tiny preset with
the same loss, and reports its compile phases."""

from __future__ import annotations

import torch

from bench import compile_time


def test_scopes_agree_on_the_loss_and_report_their_compile_phases():
    results = compile_time.main(["--device", "cpu", "--preset", "tiny", "--backend", "aot_eager", "--batch", "1",
                                 "--seq", "16", "--steps", "1", "--scopes", "layers,model"])
    torch._dynamo.reset()
    assert [r["scope"] for r in results] == ["layers", "model"]
    for r in results:
        assert r["first_step_s"] > 0 and r["phases_s"], r
        assert all(v >= 0 for v in r["phases_s"].values())
    summary = compile_time.against_model(results)
    assert set(summary) == {"layers"}
    assert all(s["loss_delta"] < 1e-4 for s in summary.values()), summary
