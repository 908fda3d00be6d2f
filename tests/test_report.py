"""Report stage on a tiny run: the page holds every panel, bad data becomes a note, comparison highlights."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kotodama_core.artifacts import begin, commit, write_manifest
from stages import report as report_stage
from tests.eval_fixtures import make_train_artifact, tiny_config

CHROMIUM = Path("/usr/bin/chromium")


def fake_eval_artifact(out: Path, acc: float) -> Path:
    work = begin(out)
    rows = [{"benchmark": "COPA", "metric": "acc", "value": acc, "stderr": None},
            {"benchmark": "WikiText", "metric": "word_ppl", "value": None, "stderr": None}]
    (work / "results.json").write_text(json.dumps({"rows": rows, "errors": {"sciq": "OSError: offline"},
                                                   "val_bpb": {"val_bpb": 2.5}}))
    write_manifest(work, stage="eval", config={}, inputs={})
    commit(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config()
    pages = []
    for seed, acc in ((0, 0.55), (1, 0.70)):
        train = make_train_artifact(root / f"train{seed}", steps=4, seed=seed)
        ev = fake_eval_artifact(root / f"eval{seed}", acc)
        report_stage.run(cfg, {"train": train, "eval": ev}, root / f"report{seed}")
        pages.append(root / f"report{seed}")
    return cfg, root, pages


def test_run_page_has_every_panel(runs):
    _, _, pages = runs
    html = (pages[0] / "report.html").read_text()
    for heading in ("Loss and learning rate", "Evaluation", "Stable rank across depth",
                    "Attention entropy and BOS mass", "Anisotropy profile", "RankMe trajectory", "Head entropy at layer 0"):
        assert heading in html
    assert html.count("data:image/png;base64,") >= 6
    assert "no data to plot" not in html  # loss and LR curves come from the engine's metrics keys
    assert "could not build" not in html
    assert "sciq: OSError: offline" in html            # eval error is visible
    assert "n/a" in html                                # the NaN WikiText value is annotated
    assert "http://" not in html and "https://" not in html   # self-contained


def test_missing_and_broken_metrics_become_notes(tmp_path, runs):
    cfg, root, _ = runs
    train = root / "train0"
    broken = tmp_path / "broken"
    shutil.copytree(train, broken)
    (broken / "geo_metrics.jsonl").write_text("")
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\nnot json\n')
    report_stage.run(cfg, {"train": broken}, tmp_path / "rep")
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "geo_metrics.jsonl is empty" in html
    assert "metrics.jsonl:2 is not valid JSON" in html
    assert "no eval artifact given" in html
    assert "no data to plot" in html


def test_comparison_page_highlights_differences(tmp_path, runs):
    cfg, _, pages = runs
    report_stage.run(cfg, {"fc": pages[0], "bcpt": pages[1]}, tmp_path / "cmp")
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "<th>fc</th>" in html and "<th>bcpt</th>" in html
    assert '<span class="diff">0.550</span>' in html    # COPA acc 0.55 vs 0.70
    assert "could not build" not in html


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(tmp_path, runs):
    _, _, pages = runs
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--window-size=1200,2400", f"--screenshot={shot}", (pages[0] / "report.html").as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    console_errors = [line for line in log.splitlines()
                      if "Uncaught" in line or ("CONSOLE" in line and "error" in line.lower())]
    assert console_errors == [], console_errors
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
