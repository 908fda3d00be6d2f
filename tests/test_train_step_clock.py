"""The logged step time counts training only: checkpoint, validation and monitor stalls are reported on
their own and left out of the window they fall in."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kotodama_core.config import load_config
from kotodama_core.train import engine
from kotodama_core.train.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[1]


def test_a_stall_is_left_out_of_the_next_logged_step_time(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    cfg = load_config(ROOT / "configs/presets/tiny.yaml", {"train.steps": 10})
    log = engine.RunLog(cfg, tmp_path, DistInfo(0, 1, 0, torch.device("cpu")), None, start_step=0)
    stalls = engine.Stalls(on_stall=log.exclude)
    losses = engine.LossReader()
    out = engine.StepResult(torch.tensor([2.0, 2.0]), torch.tensor(1.0), 1.0, False)

    def step(k: int, seconds: float) -> None:
        clock[0] += seconds
        losses.after(k, out.reduced, now=True)
        log.step(k, out, losses, tokens_seen=(k + 1) * 1024, averager=None, has_qat=False)

    step(0, 0.5)
    clock[0] += 7.0  # a validation pass
    stalls.add("validation", 7.0)
    step(1, 0.5)
    step(2, 0.5)
    clock[0] += 3.0  # an unreported pause counts: only stalls are left out
    step(3, 0.5)
    log.close()
    times = [json.loads(x)["step_ms"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert times == [500.0, 500.0, 500.0, 3500.0]
    assert stalls.summary() == {"validation_stall_s_total": 7.0, "validation_stall_s_max": 7.0}
