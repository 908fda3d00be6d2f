"""CPU smoke test of bench/golf_options.py: the golf preset at a tiny width, a few arms, one timed step."""

from __future__ import annotations

import math

from bench.golf_options import main

TINY = ["--device", "cpu", "--batch", "2", "--seq", "32", "--warmup", "1", "--steps", "1", "--no-compile",
        "--set", "model.hidden_size=64", "model.intermediate_size=128", "model.vocab_size=512",
        "model.num_attention_heads=2", "model.num_kv_heads=1", "model.head_dim=32",
        "model.techniques.bigram_logits.support_tokens=256"]


def test_arms_report_step_time_and_ratio(capsys):
    results = main(TINY + ["--arms", "recurrence,qat"])
    by_arm = {r["arm"]: r for r in results}
    assert list(by_arm) == ["baseline", "recurrence", "qat", "baseline_end"]
    for arm, r in by_arm.items():
        assert "error" not in r, r
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0, r
        assert math.isfinite(r["x_baseline"]) and r["x_baseline"] > 0, r
        assert math.isfinite(r["loss"]), r
    assert by_arm["recurrence"]["depth"] == 11 + 2 * 3  # layers 3-5 run 3 times: the repeats are timed
    assert by_arm["qat"]["options"] == ["qat"]
    out = capsys.readouterr().out
    assert "| recurrence |" in out and "| arm | step ms | tok/s | × baseline | peak GiB |" in out


def test_time_budget_skips_arms_not_started():
    results = main(TINY + ["--arms", "xsa,ema", "--time-budget", "0.001"])
    assert "step_ms" in results[0]
    assert [r.get("skipped") for r in results[1:]] == ["time budget"] * 3


def test_rejected_override_is_that_arms_error():
    # value_embed [9, 10] needs 11 layers: with 4 the config rejects it and only that arm fails.
    results = main(TINY + ["--arms", "value_embed", "--set", "model.num_layers=4"])
    by_arm = {r["arm"]: r for r in results}
    assert "out of range" in by_arm["value_embed"]["error"]
    assert by_arm["baseline"]["step_ms"] > 0 and by_arm["baseline_end"]["step_ms"] > 0
