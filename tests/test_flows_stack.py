"""The tiny chain through real servers: Prefect server + process worker + MLflow server on free loopback ports.

One stack for the module, tests in order (each builds on the artifacts of the one before):
fullcorpus tiny completes, reruns fully Cached, an eval change reruns only eval + report, MLflow holds the
runs, bcpt starts from the milestone, bad input fails before any task, a killed worker's training resumes,
and the UIs render the runs (when Chromium is installed).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]
pytest.importorskip("prefect")
pytest.importorskip("mlflow")

from flows.pipelines import build_plan  # noqa: E402
from infra.stack import Stack, down, running, start_worker, up  # noqa: E402
from kotodama_core.artifacts import code_version  # noqa: E402

STAGES_FC = {"data", "nca_search", "nca_data", "nca_train", "boundaries", "train", "eval", "report"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("kotodama")
    saved = dict(os.environ)
    # A pinned code version keeps the digests of the test and of the worker equal while files change.
    os.environ.update({"KOTODAMA_HOME": str(home), "KOTODAMA_PREFECT_PORT": "0", "KOTODAMA_MLFLOW_PORT": "0",
                       "KOTODAMA_CODE_VERSION": "stack-test"})
    code_version.cache_clear()
    st = Stack.from_env()
    try:
        up(st)
        from infra.demo import client_env

        os.environ.update(client_env(st))
        yield st
    finally:
        down(st, quiet=True)
        os.environ.clear()
        os.environ.update(saved)
        code_version.cache_clear()


def run(deployment: str, timeout: float | None = None, **params):
    from infra.demo import run as run_deployment, task_states

    fr = run_deployment(deployment, {"preset": "tiny", **params}, timeout=timeout)
    return fr, (task_states(fr.id) if timeout != 0 else {})


def prefect_artifacts(flow_run_id) -> dict:
    """Artifact key -> latest artifact of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in sorted(found, key=lambda a: a.created) if a.key}


def mtime(path: Path) -> float:
    return path.stat().st_mtime_ns


def test_fullcorpus_completes_then_reruns_cached(stack):
    fr, states = run("fullcorpus")
    assert fr.state.is_completed(), fr.state.message
    assert set(states) == STAGES_FC and set(states.values()) == {"Completed"}, states
    plan = {s.key: s for s in build_plan("fullcorpus", "tiny")}
    train_log = stack.home / "logs" / f"train-{plan['train'].digest[:16]}.log"
    before = {p: mtime(p) for p in (stack.home / "logs").iterdir()}
    assert train_log in before
    artifacts = prefect_artifacts(fr.id)
    assert artifacts["progress-train"].data == 100.0  # followed the training's progress lines to the end
    assert "progress-nca-search" in artifacts  # every stage that prints progress lines gets one
    assert "train/loss" in artifacts["stage-train"].data and "computed in this flow run" in artifacts["stage-train"].data
    assert "eval/" in artifacts["stage-eval"].data

    fr2, states2 = run("fullcorpus")
    assert fr2.state.is_completed(), fr2.state.message
    assert set(states2.values()) == {"Cached"}, states2
    # No stage process was started: no launch log was touched.
    assert {p: mtime(p) for p in (stack.home / "logs").iterdir()} == before


def test_changing_one_eval_key_reruns_only_eval_and_report(stack):
    fr, states = run("fullcorpus", overrides={"eval.limit": 4})
    assert fr.state.is_completed(), fr.state.message
    assert {k for k, v in states.items() if v == "Completed"} == {"eval", "report"}, states
    assert {k for k, v in states.items() if v == "Cached"} == STAGES_FC - {"eval", "report"}


def test_mlflow_holds_parent_nested_runs_metrics_and_artifacts(stack):
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name("kotodama")
    parents = c.search_runs([exp.experiment_id], "tags.`kotodama.pipeline` = 'fullcorpus'",
                            order_by=["attributes.start_time ASC"])
    assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents)
    first = parents[0]
    assert first.data.tags["kotodama.preset"] == "tiny" and first.data.tags["prefect.flow_run_id"]
    assert first.data.params["config.train.steps"] == "40"
    children = {r.data.tags["kotodama.step"]: r for r in
                c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{first.info.run_id}'")}
    assert set(children) == STAGES_FC
    train = children["train"]
    for tag in ("kotodama.stage", "kotodama.digest", "kotodama.preset", "prefect.flow_run_id"):
        assert train.data.tags[tag]
    history = c.get_metric_history(train.info.run_id, "train/loss")
    assert len(history) >= 5 and history[0].step < history[-1].step
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(train.data.metrics)
    assert any(k.startswith("geo/") and k.endswith("/layer_0") for k in train.data.metrics)  # at their steps
    arts = {a.path for a in c.list_artifacts(train.info.run_id)}
    assert {"manifest.json", "outputs.json", "config", "outputs", "model"} <= arts
    assert "model/model.pt.zst" in {a.path for a in c.list_artifacts(train.info.run_id, "model")}
    assert "outputs/checkpoints" not in {a.path for a in c.list_artifacts(train.info.run_id, "outputs")}
    assert train.info.run_id in {v.run_id for v in c.search_model_versions("name = 'kotodama-fullcorpus'")}
    assert train.inputs.dataset_inputs[0].dataset.name.startswith("data-")
    listing = json.loads(Path(c.download_artifacts(train.info.run_id, "outputs.json")).read_text())
    assert all(len(o["sha256"]) == 64 for o in listing)
    assert {a.path for a in c.list_artifacts(children["report"].info.run_id, "outputs")} >= {"outputs/report.html"}
    assert any(a.path.endswith(".json") for a in c.list_artifacts(children["eval"].info.run_id, "outputs"))
    assert c.list_artifacts(children["nca_search"].info.run_id, "outputs")  # the rule bank
    cached = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
    assert {r.data.tags.get("kotodama.cached") for r in cached} == {"true"}
    assert all(r.data.tags.get("kotodama.computed_by") for r in cached)
    # Every parent, fresh or fully cached, carries the headline numbers, tags and a readable name.
    for parent in parents[:2]:
        m = parent.data.metrics
        assert {"train/loss", "val/bpb", "train/tokens_seen", "train/epochs", "train/wall_s",
                "train/tokens_per_s"} <= set(m), sorted(m)
        assert any(k.startswith("eval/") and k.endswith("/acc") for k in m)
        assert parent.info.run_name.startswith("fullcorpus · tiny")
        for tag in ("kotodama.overrides", "kotodama.config_digest", "kotodama.code_version"):
            assert parent.data.tags[tag]


def test_bcpt_starts_from_the_milestone_with_fresh_optimizer_and_warmup(stack):
    fr, states = run("bcpt")
    assert fr.state.is_completed(), fr.state.message
    assert set(states.values()) == {"Completed"}, states
    plan = {s.key: s for s in build_plan("bcpt", "tiny")}
    fc_train = {s.key: s for s in build_plan("fullcorpus", "tiny")}["train"].out
    m = json.loads(plan["train"].manifest.read_text())
    assert m["init"] == f"weights:{fc_train / 'checkpoints' / 'step_0000030.pt.zst'}"
    assert m["resumed_from"] is None
    rows = [json.loads(x) for x in (plan["train"].out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lr_mult" in r]
    warmup = plan["train"].cfg.schedule.warmup_steps
    # Its own schedule from step 0: the first steps ramp up over `warmup` steps, then hold at 1.
    assert rows[0]["step"] <= warmup and rows[0]["lr_mult"] < 1.0
    assert rows[0]["tokens_seen"] == (rows[0]["step"] + 1) * plan["train"].cfg.train.global_batch_tokens
    assert any(r["lr_mult"] == 1.0 for r in rows)


def _failed_before_any_task(match: str, **params) -> None:
    fr, states = run(params.pop("deployment"), **params)
    assert fr.state.is_failed() and states == {}, (fr.state, states)
    assert match in (fr.state.message or ""), fr.state.message


def test_bad_input_fails_before_any_work(stack, tmp_path):
    import subprocess
    import sys

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        n_runs = len(client.read_flow_runs())
    cli = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", "kotodama/fullcorpus",
                          "--param", "preset=tiny", "--param", "foo=1"], capture_output=True, text=True)
    assert cli.returncode != 0 and "not found on the deployment: 'foo'" in " ".join((cli.stdout + cli.stderr).split())
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == n_runs  # refused before a flow run existed
    _failed_before_any_task("unknown config key 'train.bogus'", deployment="fullcorpus",
                            overrides={"train.bogus": 1})
    _failed_before_any_task("does not exist", deployment="bcpt", init_checkpoint=str(tmp_path / "missing.pt.zst"))
    nca_model = {s.key: s for s in build_plan("fullcorpus", "tiny")}["nca_train"].out / "model.pt.zst"
    _failed_before_any_task("does not fit the tiny model: embed_tokens.weight: checkpoint (10002, 64)",
                            deployment="bcpt", init_checkpoint=str(nca_model))
    import torch

    if not torch.cuda.is_available():  # preflight: the card's recipe is refused on a CPU machine, by name
        _failed_before_any_task("preset 'proxy-108m' needs a CUDA GPU", deployment="nca", preset="proxy-108m")


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_killed_worker_resumes_training_from_last_checkpoint(stack):
    over = {"train.steps": 60, "train.checkpoint.every_steps": 10, "train.log_every": 5}
    plan = {s.key: s for s in build_plan("nca", "tiny", over)}
    ckpts = plan["nca_train"].out.with_name(plan["nca_train"].out.name + ".partial") / "checkpoints"
    run("nca", timeout=0, overrides=over)
    deadline = time.monotonic() + 400
    while not (ckpts.is_dir() and any(p.name >= "step_0000020" for p in ckpts.glob("step_*.pt.zst"))):
        assert time.monotonic() < deadline, "training never reached its step-20 checkpoint"
        time.sleep(0.5)
    worker = running(stack)["prefect-worker"]
    victims = [worker, *_descendants(worker)]
    for pid in victims:  # the worker, its flow-run process and the training process, all at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not plan["nca_train"].manifest.exists()
    gone = time.monotonic() + 30  # SIGKILL is delivered asynchronously: a big process takes a moment to exit
    while "prefect-worker" in running(stack):
        assert time.monotonic() < gone, "the killed worker did not exit"
        time.sleep(0.1)
    start_worker(stack)
    fr, states = run("nca", overrides=over)
    assert fr.state.is_completed(), fr.state.message
    assert states["nca_search"] == states["nca_data"] == "Cached" and states["nca_train"] == "Completed"
    m = json.loads(plan["nca_train"].manifest.read_text())
    assert m["resumed_from"] is not None and m["resumed_from"] >= 20, m["resumed_from"]


def test_uis_show_the_runs_without_console_errors(stack, tmp_path):
    from bench.ui_check import chromium_binary, run_checks

    if chromium_binary() is None:
        pytest.skip("chromium not installed")
    results = run_checks(stack.urls(), tmp_path / "ui")
    assert len(results) == 4
    for r in results:
        assert r.ok, (r.url, r.errors, r.missing)
        assert r.screenshot.stat().st_size > 10_000
