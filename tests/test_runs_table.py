"""`kotodama runs`: parent runs from a real tracking store, as a table and as JSON; errors in one line."""

from __future__ import annotations

import json

import pytest

from flows import runs_table
from kotodama_core.errors import UserError

pytest.importorskip("mlflow")


@pytest.fixture
def parents(tracking):
    """Three flow runs' parent runs and one stage run, in the `tracking` store."""
    client, exp = tracking

    def parent(name: str, pipeline: str, **metrics: float) -> str:
        run = client.create_run(exp, run_name=name, tags={runs_table.PIPELINE_TAG: pipeline})
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key.replace("__", "/"), value)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    parent("fullcorpus · tiny", "fullcorpus", train__loss=9.2, val__bpb=2.74, eval__PIQA__acc=0.625,
           train__tokens_per_s=1280.0)
    parent("fullcorpus · tiny · optim.muon.lr=0.03", "fullcorpus", train__loss=9.0, val__bpb=2.60)
    parent("bcpt · tiny", "bcpt", train__loss=8.8, val__bpb=3.2)
    client.create_run(exp, run_name="a stage run")  # no pipeline tag: not a flow run
    return client


def test_table_lists_parent_runs_with_headline_columns(parents, capsys):
    assert runs_table.main(["--sort", "val/bpb"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["run", "status", "started", "train/loss", "val/bpb", "eval/PIQA/acc"]
    assert [line.split("  ")[0].strip() for line in lines[1:]] == [
        "fullcorpus · tiny · optim.muon.lr=0.03", "fullcorpus · tiny", "bcpt · tiny"]
    assert "1,280" in lines[2] and lines[1].split()[-1] == "-"  # a metric a run lacks shows as '-'


def test_pipeline_filter_metric_columns_and_json(parents, capsys):
    assert runs_table.main(["--pipeline", "bcpt", "--metric", "val/bpb"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "status", "started", "val/bpb"] and len(out) == 2 and "3.2" in out[1]
    assert runs_table.main(["--json", "--limit", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["status"] == "FINISHED" and "train/loss" in r["metrics"] for r in rows)


def test_errors_name_what_to_do(parents, monkeypatch):
    with pytest.raises(UserError, match="no MLflow experiment 'other'"):
        runs_table.main(["--experiment", "other"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI is not set"):
        runs_table.main([])
