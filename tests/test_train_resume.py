"""Exact resume: a run SIGKILLed after N steps and restarted equals the uninterrupted 2N-step run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kotodama_core.config import apply_overrides, load_tree
from kotodama_core.model.io import load_pt_zst
from kotodama_core.train.engine import FAULT_KILL_ENV

from .conftest import CONFIGS, ROOT, free_port, tiny_train_overrides


def write_config(path: Path, **extra) -> Path:
    tree = apply_overrides(load_tree(CONFIGS / "presets/tiny.yaml"), tiny_train_overrides(**extra))
    path.write_text(yaml.safe_dump(tree))
    return path


def launch(config: Path, out: Path, data: Path, nproc: int, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_KILL_ENV, None)
    if kill_at:
        env[FAULT_KILL_ENV] = str(kill_at)
    stage = ["-m", "stages.train", "--config", str(config), "--out", str(out), "--input", f"data={data}"]
    if nproc == 1:
        cmd = [sys.executable, *stage]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *stage]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_and_restarted_run_is_exact(tmp_path, markov_data, nproc):
    config = write_config(tmp_path / "run.yaml")
    full = launch(config, tmp_path / "full", markov_data, nproc)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = launch(config, tmp_path / "resumed", markov_data, nproc, kill_at=4)
    assert killed.returncode != 0, "the fault hook should have killed the run at step 4"
    assert not (tmp_path / "resumed").exists(), "a killed run must not look finished"
    assert (tmp_path / "resumed.partial" / "checkpoints" / "step_0000004.pt.zst").is_file()
    restarted = launch(config, tmp_path / "resumed", markov_data, nproc)
    assert restarted.returncode == 0, restarted.stderr[-3000:]

    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["resumed_from"] == 4
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(8)) and a == b  # every step's loss, exactly
    wa = load_pt_zst(tmp_path / "full" / "model.pt.zst")
    wb = load_pt_zst(tmp_path / "resumed" / "model.pt.zst")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"
    assert a[7] < a[0]
