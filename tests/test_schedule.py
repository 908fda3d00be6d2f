"""WSD learning-rate multiplier at the steps that matter."""

from __future__ import annotations

import math

import pytest

from kotodama_core.optim import ScheduleConfig, wsd_lr_multiplier


def test_warmup_stable_cosine_decay():
    cfg = ScheduleConfig(warmup_steps=10, stable_fraction=0.9, decay="cosine")
    f = lambda s: wsd_lr_multiplier(s, 100, cfg)  # noqa: E731
    assert f(0) == pytest.approx(0.1)  # step 0 trains at the first warmup LR, not the base LR
    assert f(4) == pytest.approx(0.5)
    assert f(9) == 1.0 and f(10) == 1.0 and f(50) == 1.0 and f(89) == 1.0
    assert f(90) == 1.0  # decay starts at floor(0.9 · 100) with p = 0
    assert f(95) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert f(100) == pytest.approx(0.0) and f(500) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


@pytest.mark.parametrize("decay, at_95", [("sqrt", 1 - math.sqrt(0.5)), ("linear", 0.5)])
def test_other_decay_shapes(decay, at_95):
    cfg = ScheduleConfig(warmup_steps=10, stable_fraction=0.9, decay=decay)
    assert wsd_lr_multiplier(95, 100, cfg) == pytest.approx(at_95)
    assert wsd_lr_multiplier(90, 100, cfg) == 1.0


def test_min_lr_ratio_and_no_warmup():
    cfg = ScheduleConfig(warmup_steps=0, stable_fraction=0.5, decay="linear", min_lr_ratio=0.1)
    assert wsd_lr_multiplier(0, 10, cfg) == 1.0
    assert wsd_lr_multiplier(5, 10, cfg) == 1.0
    assert wsd_lr_multiplier(7, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.6)
    assert wsd_lr_multiplier(10, 10, cfg) == pytest.approx(0.1)


def test_fullcorpus_schedule():
    """fullcorpus: 5000 warmup steps, stable to 90 % of 81,252 steps, cosine over the rest."""
    cfg = ScheduleConfig(warmup_steps=5000)
    total = 81_252
    assert wsd_lr_multiplier(0, total, cfg) == pytest.approx(1 / 5000)
    assert wsd_lr_multiplier(4999, total, cfg) == 1.0
    assert wsd_lr_multiplier(72_000, total, cfg) == 1.0  # the bcpt branch point is still on the plateau
    assert wsd_lr_multiplier(73_126, total, cfg) == 1.0
    assert wsd_lr_multiplier(73_127, total, cfg) < 1.0
    assert wsd_lr_multiplier(total - 1, total, cfg) == pytest.approx(0.0, abs=1e-7)


def test_warmup_longer_than_the_stable_phase_multiplies():
    cfg = ScheduleConfig(warmup_steps=100, stable_fraction=0.5, decay="linear")
    assert wsd_lr_multiplier(74, 100, cfg) == pytest.approx(0.75 * (1 - 24 / 50))


def test_bad_arguments():
    cfg = ScheduleConfig()
    with pytest.raises(ValueError, match="total_steps"):
        wsd_lr_multiplier(0, 0, cfg)
    with pytest.raises(ValueError, match="step must be"):
        wsd_lr_multiplier(-1, 10, cfg)
    with pytest.raises(ValueError, match="stable_fraction"):
        ScheduleConfig(stable_fraction=1.5)
