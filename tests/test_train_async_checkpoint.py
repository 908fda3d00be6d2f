"""Async checkpoints on the tiny preset: a SIGKILL during a background write leaves the previous checkpoint
valid and the restarted run resumes from it; the stalls are recorded as separate figures."""

from __future__ import annotations

import json

from kotodama_core.model.io import load_pt_zst
from kotodama_core.train.checkpoint import FAULT_KILL_IN_WRITE_ENV, checkpoint_name, list_checkpoints

from .test_train_resume import launch, losses, write_config


def test_sigkill_during_background_write_keeps_previous_checkpoint(tmp_path, markov_data, monkeypatch):
    config = write_config(tmp_path / "run.yaml", **{"train.val_every": 4, "train.val_batches": 1})
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_KILL_IN_WRITE_ENV, "8")
    killed = launch(config, out, markov_data, 1)
    assert killed.returncode != 0 and not out.exists(), killed.stderr[-2000:]
    ckdir = out.with_name("run.partial") / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckdir)] == [4], "the torn step-8 write must not be published"
    assert list(ckdir.glob(".step_0000008*")), "the kill hit the temp file half-way"
    assert load_pt_zst(ckdir / checkpoint_name(4))["step"] == 4

    monkeypatch.delenv(FAULT_KILL_IN_WRITE_ENV)
    restarted = launch(config, out, markov_data, 1)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from"] == 4 and manifest["status"] == "completed_after_resume"
    assert sorted(losses(out)) == list(range(8))
    assert not list((out / "checkpoints").glob(".*tmp*")), "the killed writer's temp file is cleared on restart"
    m = manifest["metrics"]
    for kind in ("checkpoint", "validation"):
        assert m[f"{kind}_stall_s_max"] <= m[f"{kind}_stall_s_total"]
    stalls = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stalls if "checkpoint_stall_s" in r] == [3, 7]
    assert all(0 <= r["checkpoint_wait_s"] <= r["checkpoint_stall_s"] for r in stalls if "checkpoint_stall_s" in r)
