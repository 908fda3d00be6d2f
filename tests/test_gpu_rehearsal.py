"""bench/gpu_rehearsal.sh: the whole stage chain, run here at the tiny preset on the CPU (its GPU form,
--preset proxy-108m, runs the same script on the device), and the headline helper it prints through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import rehearsal_headline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_rehearsal.sh"
STEPS = ["nca_search", "nca_data", "nca_train", "boundaries", "data", "fullcorpus_killed", "fullcorpus_resumed",
         "eval", "report"]


def _run(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "corpus-mix").is_dir(),
                    reason="needs the shared data beside the repository (../shared/data)")
def test_tiny_rehearsal_runs_every_stage_and_resumes_the_killed_run(tmp_path):
    proc = _run("--preset", "tiny", "--out", str(tmp_path / "r"), "--steady", "24")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "r" / "rehearsal.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == STEPS + ["fullcorpus_steady"]
    by = {r["stage"]: r for r in rows}
    assert all(r["exit"] == 0 for r in rows if r["stage"] != "fullcorpus_killed")
    assert by["fullcorpus_killed"]["exit"] != 0  # SIGKILLed right after its step-20 checkpoint
    assert "step_0000020.pt.zst" in by["fullcorpus_killed"]["headline"]["checkpoints_left"]
    resumed = by["fullcorpus_resumed"]["headline"]
    assert resumed["resumed_from"] == 20 and resumed["status"] == "completed_after_resume"
    assert resumed["steps"] == 40 and resumed["tokens_per_s_steady"] > 0
    assert 0 < by["nca_search"]["headline"]["pass_rate"] <= 1
    assert by["boundaries"]["headline"]["boundaries"][0] == 0
    assert any(k.endswith("/acc") for k in by["eval"]["headline"])
    assert all(r["seconds"] > 0 for r in rows)
    # --steady: one more run whose checkpoint, validation and monitor stalls are reported apart
    steady = by["fullcorpus_steady"]["headline"]
    assert steady["steps"] == 24 and steady["tokens_per_s_steady"] > 0
    assert all(steady[f"{kind}_stall_s_max"] > 0 for kind in ("checkpoint", "validation", "monitor"))
    # every stage's line and the closing table are printed
    for step in STEPS:
        assert f"[rehearsal] {step} " in proc.stdout
    assert "[rehearsal] fullcorpus resumed from step 20: status completed_after_resume" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("total")


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "corpus-mix").is_dir(),
                    reason="needs the shared data beside the repository (../shared/data)")
def test_steady_only_runs_the_data_stage_and_the_steady_stage_from_scratch(tmp_path):
    proc = _run("--preset", "tiny", "--out", str(tmp_path / "r"), "--steady-only", "12")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "r" / "rehearsal.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["data", "fullcorpus_steady"]
    steady = rows[1]["headline"]
    assert steady["steps"] == 12 and steady["tokens_per_s_steady"] > 0
    manifest = json.loads((tmp_path / "r" / "steady" / "manifest.json").read_text())
    assert manifest["init"] == "scratch"


def test_bad_arguments_are_named(tmp_path):
    proc = _run("--preset", "huge", "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode == 2 and "--preset must be tiny or proxy-108m" in proc.stderr
    proc = _run("--preset", "tiny", "--steady-only", "0", "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode == 2 and "--steady-only takes a number of steps, got 0" in proc.stderr
    proc = _run("--preset", "tiny", "--shared", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode == 2 and "shared data folder not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _run("--preset", "tiny", "--shared", str(tmp_path / "empty"), "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode == 2 and "data/corpus-mix is missing" in proc.stderr
    proc = _run("--preset", "tiny", "--steady", "many", timeout=60)
    assert proc.returncode == 2 and "--steady takes a number of steps, got many" in proc.stderr
    proc = _run("--bogus", timeout=60)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


def test_headline_of_a_killed_run_and_the_summary_table(tmp_path):
    partial = tmp_path / "fc.partial"
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "checkpoints" / "step_0000040.pt.zst").write_bytes(b"")
    rows = [{"step": 0, "tokens_per_s": 5.0}, {"step": 10, "tokens_per_s": 300.0},
            {"step": 20, "checkpoint_stall_s": 2.0}, {"step": 20, "tokens_per_s": 310.0},
            {"step": 30, "tokens_per_s": 290.0}]
    (partial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = rehearsal_headline.headline("train", tmp_path / "fc")
    assert head == {"checkpoints_left": ["step_0000040.pt.zst"], "tokens_per_s_steady": 300}
    log = tmp_path / "log.jsonl"
    rehearsal_headline.main(["fc_killed", str(tmp_path / "fc"), "12.5", "--kind", "train", "--exit", "137",
                             "--json-out", str(log)])
    table = rehearsal_headline.summary(log).splitlines()
    assert table[1].split()[:3] == ["fc_killed", "12.5", "137"] and table[-1].split() == ["total", "12.5"]


def test_device_carry_list_pins_what_the_project_environment_holds():
    """bench/rehearsal_carry.sh pins the data and eval stages' extra packages for the device; each pin
    is the version installed beside the project here (so the device runs what CI tested)."""
    import importlib.metadata as md
    import re

    text = (REPO / "bench" / "rehearsal_carry.sh").read_text()
    block = re.search(r"PACKAGES=\((.*?)\)", text, re.S).group(1)
    pins = dict(p.split("==") for p in block.split())
    assert {"ftfy", "lm_eval", "datasets"} <= set(pins)
    checked = 0
    for name, version in pins.items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue
        assert installed == version, (name, installed, version)
        checked += 1
    assert checked >= len(pins) // 2
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "rehearsal_carry.sh")]).returncode == 0
