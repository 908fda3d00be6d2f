"""The report's pure parts: binomial stderr and eval rows, training curves on a tokens axis, config
differences and the run title, tracking links, the NCA chain read from manifests."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from kotodama_core.report.config_summary import config_differences, pipeline_of, run_title
from kotodama_core.report.curves import tokens_per_step, training_curves
from kotodama_core.report.eval_rows import binomial_stderr, eval_rows
from kotodama_core.report.links import tracking_links
from kotodama_core.report.nca_summary import nca_summary


@pytest.mark.parametrize("hits,n", [(11, 20), (1, 8), (7, 7), (33, 100)])
def test_binomial_stderr_is_the_sample_std_over_sqrt_n(hits, n):
    outcomes = [1.0] * hits + [0.0] * (n - hits)
    expected = statistics.stdev(outcomes) / math.sqrt(n)   # lm-eval's mean_stderr
    assert binomial_stderr(hits / n, n) == pytest.approx(expected)


def test_binomial_stderr_refuses_what_it_cannot_know():
    assert binomial_stderr(0.5, 1) is None
    assert binomial_stderr(None, 10) is None
    assert binomial_stderr(1.5, 10) is None


def test_eval_rows_take_n_and_stderr_from_the_eval_first_then_compute_binomial():
    results = {
        "results": {"arc_easy": {"acc,none": 0.375, "acc_stderr,none": "N/A", "sample_len": 8,
                                 "acc_norm,none": 0.125, "acc_norm_stderr,none": 0.11},
                    "piqa": {"acc,none": 0.6, "n": 50, "acc_stderr": 0.07},
                    "wikitext": {"word_perplexity,none": 900.0, "sample_len": 5}},
        "rows": [{"benchmark": "ARC-Easy", "metric": "acc", "value": 0.375, "stderr": None},
                 {"benchmark": "ARC-Easy", "metric": "acc_norm", "value": 0.125, "stderr": None},
                 {"benchmark": "PIQA", "metric": "acc", "value": 0.6, "stderr": None},
                 {"benchmark": "COPA", "metric": "acc", "value": 0.5, "stderr": 0.05, "n": 100},
                 {"benchmark": "WikiText", "metric": "word_ppl", "value": 900.0, "stderr": None}]}
    rows = {(r["benchmark"], r["metric"]): r for r in eval_rows(results)}
    arc = rows[("ARC-Easy", "acc")]
    assert (arc["n"], arc["stderr_source"]) == (8, "binomial")
    assert arc["stderr"] == pytest.approx(math.sqrt(0.375 * 0.625 / 7))
    assert rows[("ARC-Easy", "acc_norm")]["stderr"] == 0.11                   # lm-eval's own
    assert rows[("ARC-Easy", "acc_norm")]["stderr_source"] == "eval"
    assert (rows[("PIQA", "acc")]["n"], rows[("PIQA", "acc")]["stderr"]) == (50, 0.07)   # the eval's fields
    assert (rows[("COPA", "acc")]["n"], rows[("COPA", "acc")]["stderr"]) == (100, 0.05)  # on the row itself
    ppl = rows[("WikiText", "word_ppl")]
    assert ppl["n"] == 5 and ppl["stderr"] is None                        # a perplexity is not binomial


ENGINE_ROWS = [
    {"step": 0, "loss": 10.8, "lr_mult": 0.25, "lr_muon": 0.005, "lr_adamw": 1.5e-4, "grad_norm": 0.9,
     "tokens_seen": 512, "tokens_per_s": 560.0},
    {"step": 5, "loss": 10.6, "lr_mult": 1.0, "lr_muon": 0.02, "lr_adamw": 6e-4, "grad_norm": 1.1,
     "tokens_seen": 3072, "tokens_per_s": 1200.0},
    {"step": 5, "val_loss": 10.7},
    {"step": 9, "loss": 10.4, "lr_mult": 0.5, "lr_muon": 0.01, "lr_adamw": 3e-4, "grad_norm": 0.8,
     "tokens_seen": 5120, "tokens_per_s": 1100.0},
]


def test_tokens_per_step_from_the_logged_tokens_then_the_config():
    assert tokens_per_step(ENGINE_ROWS) == 512
    assert tokens_per_step([{"step": 3, "loss": 1.0}], global_batch_tokens=2048) == 2048
    assert tokens_per_step([{"step": 3, "loss": 1.0}]) is None


def test_training_curves_put_train_and_val_loss_on_one_tokens_axis():
    c = training_curves(ENGINE_ROWS, final_val_loss=10.5, final_tokens=5120)
    train, val = c.loss
    assert c.x_is_tokens and c.tokens_per_step == 512
    assert train.xs == [512, 3072, 5120] and train.ys == [10.8, 10.6, 10.4]
    assert val.points and val.xs == [3072, 5120] and val.ys == [10.7, 10.5]   # logged val + the final one
    assert [x.label for x in c.lr] == ["Muon lr", "AdamW lr"] and not c.lr_is_multiplier
    assert c.grad_norm[0].ys == [0.9, 1.1, 0.8] and c.tokens_per_s[0].ys == [560.0, 1200.0, 1100.0]


def test_training_curves_fall_back_to_steps_and_the_lr_multiplier():
    rows = [{"step": 0, "loss": 3.0, "lr_mult": 0.5}, {"step": 4, "loss": 2.0, "lr_mult": 1.0}]
    c = training_curves(rows, final_val_loss=2.5)
    assert not c.x_is_tokens and c.loss[0].xs == [0, 4]
    assert c.loss[1].xs == [4] and c.loss[1].ys == [2.5]
    assert c.lr_is_multiplier and c.lr[0].ys == [0.5, 1.0]
    with_config = training_curves(rows, global_batch_tokens=100)
    assert with_config.loss[0].xs == [100, 500]                 # (step + 1) * tokens per step


def test_config_differences_are_the_overrides_not_the_naming_or_new_defaults():
    base = {"name": "fullcorpus-tiny", "optim": {"muon": {"lr": 0.02}}, "train": {"steps": 40, "new_knob": 1},
            "report": {"title": "x"}}
    run = {"name": "other", "optim": {"muon": {"lr": 0.03}}, "train": {"steps": 40}, "report": {"title": "y"},
           "extra": {"k": [1, 2]}}
    assert config_differences(base, run) == [{"key": "extra.k", "base": None, "value": [1, 2]},
                                             {"key": "optim.muon.lr", "base": 0.02, "value": 0.03}]


def test_run_title_is_pipeline_preset_and_overrides():
    assert pipeline_of("fullcorpus-tiny", "tiny") == "fullcorpus"
    assert pipeline_of("fullcorpus", "proxy-108m") == "fullcorpus"
    assert run_title("fullcorpus-tiny", "tiny", [{"key": "optim.muon.lr", "value": 0.03}]) \
        == "fullcorpus · tiny · optim.muon.lr=0.03"
    many = [{"key": f"k{i}", "value": i} for i in range(5)]
    assert run_title("bcpt", "proxy-108m", many) == "bcpt · proxy-108m · k0=0, k1=1, k2=2, +2 more"
    assert run_title("matrix.adamw", "custom", []) == "matrix.adamw"


def test_tracking_links_from_the_environment(tmp_path):
    assert tracking_links({}) == {"mlflow": [], "mlflow_uri": None, "prefect": None}
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000/", "KOTODAMA_MLFLOW_RUN_ID": "r1",
           "KOTODAMA_MLFLOW_PARENT_RUN_ID": "p1", "PREFECT__FLOW_RUN_ID": "f1",
           "PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    links = tracking_links(env)
    assert [(r["label"], r["url"]) for r in links["mlflow"]] == [
        ("pipeline run", "http://127.0.0.1:5000/#/runs/p1"), ("report stage run", "http://127.0.0.1:5000/#/runs/r1")]
    assert links["prefect"] == {"flow_run_id": "f1", "url": "http://127.0.0.1:4200/runs/flow-run/f1"}
    (tmp_path / "mlflow_run_id").write_text("t1\n")
    local = tracking_links({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns", "KOTODAMA_MLFLOW_RUN_ID": "r1",
                            "KOTODAMA_MLFLOW_UI_URL": "http://ui:5000", "PREFECT__FLOW_RUN_ID": "f1"}, tmp_path)
    assert [(r["run_id"], r["url"]) for r in local["mlflow"]] == [("r1", "http://ui:5000/#/runs/r1"),
                                                                  ("t1", "http://ui:5000/#/runs/t1")]
    assert local["prefect"] == {"flow_run_id": "f1", "url": None}            # no UI address known
    no_ui = tracking_links({"MLFLOW_TRACKING_URI": "sqlite:///m.db", "KOTODAMA_MLFLOW_RUN_ID": "r1"})
    assert no_ui["mlflow"][0]["url"] is None and no_ui["mlflow_uri"] == "sqlite:///m.db"


def _manifest(folder: Path, stage: str, inputs: dict[str, Path], metrics: dict, **extra) -> Path:
    folder.mkdir(parents=True)
    data = {"stage": stage, "digest": stage * 4, "metrics": metrics, "outputs": [],
            "inputs": {k: {"digest": "d", "path": str(v / "manifest.json")} for k, v in inputs.items()}, **extra}
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_nca_summary_follows_the_manifest_chain_from_the_boundaries(tmp_path):
    search = _manifest(tmp_path / "s", "nca_search", {}, {"tries": 10, "passed": 4, "kept": 4, "pass_rate": 0.4},
                       band=[0.4, 0.7])
    data = _manifest(tmp_path / "d", "nca_data", {"rules": search}, {"train_tokens": 1000, "train_trajectories": 8})
    train = _manifest(tmp_path / "t", "train", {"data": data}, {"final_loss": 5.0, "steps": 10})
    bounds = _manifest(tmp_path / "b", "boundaries", {"checkpoint": train, "data": data}, {}, boundaries=[0, 3])
    notes: list[str] = []
    s = nca_summary(None, bounds, {"model": {"attn_res_boundaries": [0, 2]}}, notes)
    assert notes == [] and s["search"]["pass_rate"] == 0.4 and s["band"] == [0.4, 0.7]
    assert s["data"]["train_trajectories"] == 8 and s["train"]["final_loss"] == 5.0
    assert (s["boundaries"], s["run_boundaries"]) == ([0, 3], [0, 2])
    assert nca_summary(None, None, None, notes) is None
    (search / "manifest.json").unlink()
    assert nca_summary(train, None, None, notes)["search"] == {}
    assert any("rule search" in n for n in notes)


def test_an_ablation_arm_is_compared_with_its_specs_base_run_config():
    from kotodama_core.config import load_config
    from kotodama_core.config_tree import CONFIGS_ROOT
    from kotodama_core.report.config_summary import config_summary

    arm = load_config(CONFIGS_ROOT / "runs/fullcorpus-tiny.yaml",
                      {"name": "tiny.adamw", "optim.kind": "adamw", "train.steps": 12}).model_dump(mode="json")
    notes: list[str] = []
    c = config_summary(arm, None, CONFIGS_ROOT, notes)
    assert notes == []
    assert c["title"] == "tiny ablation · arm adamw · tiny"
    assert c["ablation"] == {"name": "tiny", "arm": "adamw"} and c["base_path"] == "configs/runs/fullcorpus-tiny.yaml"
    assert [(o["key"], o["value"]) for o in c["overrides"]] == [("optim.kind", "adamw"), ("train.steps", 12)]
    plain = config_summary({**arm, "name": "nowhere.arm"}, None, CONFIGS_ROOT, notes)
    assert plain["ablation"] is None and not plain["base_found"] and plain["title"] == "nowhere.arm · tiny"


def test_spread_in_stderrs_is_the_gap_over_the_stderr_of_the_difference():
    from kotodama_core.report.sections import spread_in_stderrs

    cells = [{"value": 0.55, "stderr": 0.03}, {"value": 0.70, "stderr": 0.04}, {"value": 0.6, "stderr": None}]
    assert spread_in_stderrs(cells) == pytest.approx(0.15 / 0.05)
    assert spread_in_stderrs([{"value": 0.5, "stderr": None}, {"value": 0.6, "stderr": 0.1}]) is None
    assert spread_in_stderrs([{"value": 0.5, "stderr": 0.1}, {}]) is None


def test_headline_reads_the_training_manifest_and_medians_of_the_logs(tmp_path):
    from kotodama_core.report.summary import headline

    (tmp_path / "manifest.json").write_text(json.dumps({"metrics": {
        "final_loss": 9.2, "val_loss": 9.1, "val_loss_averaged": 9.0, "tokens_seen": 5120, "steps": 10}}))
    h = headline(tmp_path, ENGINE_ROWS + [{"step": 9, "loss": 10.4, "tokens_per_s": 1300.0, "mfu": 0.2}],
                 None, None, [])
    assert (h["final_loss"], h["val_loss"], h["val_loss_averaged"]) == (9.2, 9.1, 9.0)
    assert h["tokens_per_s"] == 1200.0          # median of the rows after the first (start-up) one
    assert h["mfu"] == 0.2 and h["model_bytes"] is None


def test_ui_check_picks_the_newest_report_page(tmp_path, monkeypatch):
    import os

    from bench.ui_check import newest_report

    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path))
    assert newest_report() is None
    for digest, mtime in (("aaa", 1000), ("bbb", 3000), ("ccc", 2000)):
        page = tmp_path / "artifacts" / "report" / digest / "report.html"
        page.parent.mkdir(parents=True)
        page.write_text("<html></html>")
        os.utime(page, (mtime, mtime))
    assert newest_report() == tmp_path / "artifacts" / "report" / "bbb" / "report.html"
