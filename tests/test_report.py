"""Report stage on tiny runs: headline first, every section present and in order, eval n and stderr, config
overrides, NCA summary, tracking links; bad data becomes a note; the comparison page keeps the same order."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kotodama_core.artifacts import begin, commit, read_manifest, write_manifest
from kotodama_core.config import dump_yaml, load_config
from stages import report as report_stage
from tests.eval_fixtures import REPO, make_train_artifact, tiny_config

SECTION_IDS = ("headline", "evaluation", "configuration", "nca", "tracking", "geometry", "notes")
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "KOTODAMA_MLFLOW_RUN_ID", "KOTODAMA_MLFLOW_PARENT_RUN_ID",
                "KOTODAMA_MLFLOW_UI_URL", "PREFECT__FLOW_RUN_ID", "PREFECT_UI_URL", "PREFECT_API_URL")
GBT = 512  # fullcorpus-tiny's train.global_batch_tokens


def engine_metrics(train: Path, steps: int, val_every: int = 2) -> None:
    """Rewrite a fixture's metrics.jsonl with the keys the training engine writes (tokens_seen after the
    step, both optimizer groups' lr) and its `{step, val_loss}` rows."""
    rows = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    out = []
    for r in rows:
        step = r["step"] - 1  # the fixture counts from 1, the engine from 0
        out.append({**r, "step": step, "tokens_seen": (step + 1) * GBT, "lr_muon": 0.03 * r["lr_mult"],
                    "lr_adamw": 6e-4 * r["lr_mult"]})
        if (step + 1) % val_every == 0:
            out.append({"step": step, "val_loss": r["loss"] + 0.1})
    (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


def fake_eval_artifact(out: Path, acc: float, n: int = 20) -> Path:
    """COPA acc with lm-eval's n (sample_len) and no stderr (bootstrap off), PIQA with the eval's own stderr,
    WikiText NaN, SciQ failed."""
    work = begin(out)
    rows = [{"benchmark": "COPA", "metric": "acc", "value": acc, "stderr": None},
            {"benchmark": "PIQA", "metric": "acc", "value": 0.6, "stderr": None},
            {"benchmark": "WikiText", "metric": "word_ppl", "value": None, "stderr": None}]
    results = {"copa": {"acc,none": acc, "acc_stderr,none": "N/A", "sample_len": n},
               "piqa": {"acc,none": 0.6, "acc_stderr,none": "N/A", "n": 50, "acc_stderr": 0.0421}}
    (work / "results.json").write_text(json.dumps({"results": results, "rows": rows,
                                                   "errors": {"sciq": "OSError: offline"},
                                                   "val_bpb": {"val_bpb": 2.5}}))
    write_manifest(work, stage="eval", config={}, inputs={})
    commit(out)
    return out


def _artifact(out: Path, stage: str, inputs: dict, metrics: dict, extra: dict | None = None,
              files: dict[str, bytes] | None = None) -> Path:
    work = begin(out)
    for name, data in (files or {}).items():
        (work / name).write_bytes(data)
    write_manifest(work, stage=stage, config={}, inputs={k: read_manifest(v) for k, v in inputs.items()},
                   metrics=metrics, extra=extra)
    commit(out)
    return out


def fake_nca_chain(root: Path) -> tuple[Path, Path]:
    """nca_search -> nca_data -> nca_train -> boundaries manifests, as those stages write them."""
    import matplotlib.pyplot as plt
    import io

    search = _artifact(root / "nca_search", "nca_search", {},
                       {"tries": 24, "passed": 8, "kept": 8, "pass_rate": 1 / 3, "score_median": 0.5},
                       {"band": [0.4, 0.7]})
    data = _artifact(root / "nca_data", "nca_data", {"rules": search},
                     {"train_tokens": 32895, "train_trajectories": 96, "train_rules": 6, "val_tokens": 8256,
                      "val_trajectories": 32, "val_rules": 2})
    train = _artifact(root / "nca_train", "train", {"data": data},
                      {"final_loss": 7.46, "val_loss": 8.29, "steps": 32, "tokens_seen": 16384})
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    bounds = _artifact(root / "boundaries", "boundaries", {"checkpoint": train, "data": data},
                       {"num_boundaries": 2}, {"boundaries": [0, 1]},
                       files={"boundaries.json": json.dumps({"boundaries": [0, 1],
                                                             "gap_scores": [5.0, -3.0, -2.0]}).encode(),
                              "profile.png": buf.getvalue()})
    return train, bounds


def write_run_config(train: Path, **overrides) -> None:
    cfg = load_config(REPO / "configs/runs/fullcorpus-tiny.yaml", overrides)
    (train / "config.yaml").write_text(dump_yaml(cfg))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config()
    nca_train, bounds = fake_nca_chain(root)
    pages = []
    mp = pytest.MonkeyPatch()
    for key in TRACKING_ENV:
        mp.delenv(key, raising=False)
    try:
        for seed, acc, lr in ((0, 0.55, 0.03), (1, 0.70, 0.02)):
            train = make_train_artifact(root / f"train{seed}", steps=6, seed=seed)
            engine_metrics(train, steps=6)
            write_run_config(train, **{"optim.muon.lr": lr})
            ev = fake_eval_artifact(root / f"eval{seed}", acc)
            report_stage.run(cfg, {"train": train, "eval": ev, "nca_train": nca_train, "boundaries": bounds},
                             root / f"report{seed}")
            pages.append(root / f"report{seed}")
    finally:
        mp.undo()
    return cfg, root, pages


def section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', html)


def section(html: str, ident: str) -> str:
    start = html.index(f'<section id="{ident}">')
    return html[start:html.index("</section>", start)]


def test_run_page_title_is_the_run_name_and_sections_come_headline_first(runs):
    _, _, pages = runs
    html = (pages[0] / "report.html").read_text()
    assert section_ids(html) == list(SECTION_IDS)
    assert "<h1>fullcorpus · tiny · optim.muon.lr=0.03</h1>" in html
    assert "<title>fullcorpus · tiny · optim.muon.lr=0.03</title>" in html
    assert "could not build" not in html
    assert "http://" not in html and "https://" not in html   # self-contained, not tracked here


def test_headline_has_loss_lr_grad_norm_throughput_against_tokens(runs):
    _, _, pages = runs
    head = section((pages[0] / "report.html").read_text(), "headline")
    for alt in ("loss curve", "learning-rate curve", "gradient-norm curve", "throughput curve"):
        assert re.search(rf'<img alt="{alt}" src="data:image/png;base64,', head), alt
    assert "no data to plot" not in head
    assert "MFU (median)" in head              # the fixture logs mfu
    summary = json.loads((pages[0] / "summary.json").read_text())[0]
    assert summary["tokens_per_step"] == GBT


def test_eval_table_shows_n_and_stderr(runs):
    _, _, pages = runs
    ev = section((pages[0] / "report.html").read_text(), "evaluation")
    # COPA: lm-eval gave n (sample_len 20) but no stderr: binomial sqrt(0.55 * 0.45 / 19) = 0.1141
    assert re.search(r"COPA</td><td class=\"l\">acc</td><td>0.550</td><td>± 0.114†</td><td>20</td>", ev), ev
    # PIQA: the eval's own n and stderr win over the binomial one
    assert "<td>0.600</td><td>± 0.042</td><td>50</td>" in ev
    assert "sqrt(p (1 − p) / (n − 1))" in ev
    assert "sciq: OSError: offline" in ev and "n/a" in ev


def test_config_section_names_the_run_and_its_overrides(runs):
    _, _, pages = runs
    conf = section((pages[0] / "report.html").read_text(), "configuration")
    assert "<code>fullcorpus-tiny</code>" in conf and "<code>configs/runs/fullcorpus-tiny.yaml</code>" in conf
    assert "Overrides (1)" in conf
    assert "<code>optim.muon.lr</code></td><td class=\"l\"><code>0.02</code></td><td class=\"l\"><code>0.03</code>" \
        in conf
    second = section((pages[1] / "report.html").read_text(), "configuration")
    assert "No overrides" in second


def test_nca_section_summarizes_search_data_training_and_boundaries(runs):
    _, _, pages = runs
    nca = section((pages[0] / "report.html").read_text(), "nca")
    for text in ("rules tried</td><td>24", "pass rate</td><td>33.3%", "0.4 – 0.7", "6 / 96 / 32,895",
                 "final loss</td><td>7.4600", "<code>[0, 1]</code>", "<code>[0, 2]</code>"):
        assert text in nca, text
    assert 'alt="NCA layer profile' in nca and "data:image/png;base64," in nca


def test_tracking_says_not_tracked_without_mlflow_or_prefect(runs):
    _, _, pages = runs
    track = section((pages[0] / "report.html").read_text(), "tracking")
    assert track.count("not tracked") == 2


def test_tracking_links_to_mlflow_and_prefect_runs(tmp_path, runs, monkeypatch):
    cfg, root, _ = runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("KOTODAMA_MLFLOW_RUN_ID", "abc123")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "9a8b-7c6d")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    report_stage.run(cfg, {"train": root / "train0"}, tmp_path / "rep")
    track = section((tmp_path / "rep" / "report.html").read_text(), "tracking")
    assert '<a href="http://127.0.0.1:5000/#/runs/abc123">abc123</a>' in track
    assert '<a href="http://127.0.0.1:4200/runs/flow-run/9a8b-7c6d">9a8b-7c6d</a>' in track
    assert "not tracked" not in track


def test_missing_and_broken_metrics_become_notes(tmp_path, runs):
    cfg, root, _ = runs
    broken = tmp_path / "broken"
    shutil.copytree(root / "train0", broken)
    (broken / "geo_metrics.jsonl").write_text("")
    (broken / "config.yaml").unlink()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\nnot json\n')
    report_stage.run(cfg, {"train": broken}, tmp_path / "rep")
    html = (tmp_path / "rep" / "report.html").read_text()
    assert section_ids(html) == [s for s in SECTION_IDS if s != "nca"]   # no NCA input, no NCA section
    notes = section(html, "notes")
    assert "geo_metrics.jsonl is empty" in notes
    assert "metrics.jsonl:2 is not valid JSON" in notes
    assert "no eval artifact given" in notes
    assert "no config.yaml" in notes
    assert "no data to plot" in html
    assert "could not build" not in html
    # the report's own config stands in: the tiny preset, named "run", has no base file to diff against
    assert "overrides unknown" in section(html, "configuration")


def test_comparison_page_is_headline_first_and_lists_config_differences(tmp_path, runs):
    cfg, _, pages = runs
    report_stage.run(cfg, {"fc": pages[0], "bcpt": pages[1]}, tmp_path / "cmp")
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert section_ids(html) == list(SECTION_IDS)
    assert "<th>fc</th>" in html and "<th>bcpt</th>" in html
    ev = section(html, "evaluation")
    assert '<span class="diff">0.550</span> <span class="pm">± 0.114†</span>' in ev   # COPA acc 0.55 vs 0.70
    # (0.70 - 0.55) / sqrt(0.1141² + 0.1051²) = 0.97: within the noise of 20 examples
    assert re.search(r"COPA acc</td>.*?<td>1\.0</td></tr>", ev), ev
    head = section(html, "headline")
    assert head.count('src="data:image/png;base64,') == 4
    conf = section(html, "configuration")
    assert "Keys that differ (1)" in conf and "<code>optim.muon.lr</code>" in conf
    assert "could not build" not in html


def test_comparison_reads_summaries_written_before_the_headline_sections(tmp_path, runs):
    cfg, _, pages = runs
    old = []
    for i, page in enumerate(pages):
        s = json.loads((page / "summary.json").read_text())[0]
        for key in ("config", "run_config", "links", "nca", "tokens_per_step", "title"):
            s.pop(key)
        s["eval_rows"] = [{k: r[k] for k in ("benchmark", "metric", "value", "stderr")} for r in s["eval_rows"]]
        folder = tmp_path / f"old{i}"
        shutil.copytree(page, folder)
        (folder / "summary.json").write_text(json.dumps([s]))
        old.append(folder)
    report_stage.run(cfg, {"a": old[0], "b": old[1]}, tmp_path / "cmp")
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert section_ids(html) == [s for s in SECTION_IDS if s != "nca"]
    assert "could not build" not in html
    assert section(html, "tracking").count("not tracked") == 4
    assert section(html, "headline").count('src="data:image/png;base64,') == 4
