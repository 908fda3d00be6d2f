"""The ablation deployment: strict specs, plans whose arms share upstream stages, and a tiny CPU run."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from flows.ablation import build_ablation_plan, changed_keys, expand_arms, load_spec
from kotodama_core.config import CONFIGS_ROOT, ConfigError, load_config
MATRIX = ["nca-attnres", "p1-adamw", "p3-muon", "nca-only", "attnres-fresh", "nca-routing-reset"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_spec(**changes):
    spec = yaml.safe_load((CONFIGS_ROOT / "ablations/tiny.yaml").read_text())
    spec.update(changes)
    return spec


# -- spec parsing: unknown or inconsistent input fails before anything runs ---------------------------

@pytest.mark.parametrize("changes, match", [
    ({"bogus": 1}, "unknown ablation key 'bogus'"),
    ({"arms": {"a": {"optim.bogus": 1}, "b": {}}}, "arm 'a'.*unknown config key 'optim.bogus'"),
    ({"overrides": {"eval.nope": 1}}, "unknown config key 'eval.nope'"),
    ({"arms": {"a": {"steps": 3}, "b": {}}}, "must be dotted"),
    ({"factors": {"optim.kind": ["hybrid", "adamw"]}}, "exactly one of `arms` or `factors`"),
    ({"arms": {"only": {}}}, "at least two arms"),
    ({"arms": {"train": {"optim.kind": "adamw"}, "b": {}}}, "arm name 'train'"),
    ({"arms": {"a=b": {"optim.kind": "adamw"}, "b": {}}}, "arm name 'a=b'"),
    ({"arms": {"a": {}, "b": {}}}, "only one arm may be the base itself"),
    ({"arms": {"a": {"optim.kind": "hybrid"}, "b": {}}}, r"\['optim.kind'\] already have these values in the base"),
    ({"arms": None, "factors": {"lr": {"a": {"optim.adamw.lr": 6.0e-4}, "b": {"optim.adamw.lr": 0.0006}}}},
     "arms 'a' and 'b' train the same configuration"),
    ({"arms": None, "factors": {"optim.adamw.lr": [6.0e-4, 0.0006]}}, "two arms named 'lr-0.0006'"),
    ({"arms": {"a": {"train.steps": 5}, "b": {}}}, "train.steps is fixed by token_budget"),
    ({"token_budget": 100}, "less than one step of 512 tokens"),
    ({"arms": {"a": {"nca_run.nca.seed": 3}, "b": {}}}, "nca_run.… keys need train.init.mode nca_transfer"),
    ({"arms": {"a": {"train.init.mode": "nca_transfer"}, "b": {}}}, "give the spec an `nca:` run config"),
    ({"arms": {"a": {"train.init.mode": "weights"}, "b": {}}}, "from scratch or by nca_transfer"),
    ({"base": "runs/nowhere"}, "run config 'runs/nowhere' not found"),
])
def test_bad_specs_are_rejected_before_any_work(home, changes, match):
    with pytest.raises(ConfigError, match=match):
        build_ablation_plan(tiny_spec(**changes))
    assert not home.exists()


def test_factor_levels_must_be_named_or_keyed():
    with pytest.raises(ConfigError, match="needs a dotted config key"):
        build_ablation_plan(tiny_spec(arms=None, factors={"optimizer": ["hybrid", "adamw"]}))
    with pytest.raises(ConfigError, match="at least two levels"):
        build_ablation_plan(tiny_spec(arms=None, factors={"optim.kind": ["adamw"]}))
    with pytest.raises(ConfigError, match="no ablation spec 'nope'.*kotodama-matrix.*tiny"):
        load_spec("nope")


# -- plans: one factor per arm, shared upstream digests, factorial expansion --------------------------

def test_tiny_plan_shares_data_and_changes_one_factor_per_arm():
    plan = build_ablation_plan("tiny")
    assert [a.name for a in plan.arms] == ["hybrid", "adamw"]
    hybrid, adamw = plan.arms
    # An arm differs from the base exactly at the keys it overrides (the base arm nowhere).
    assert hybrid.changed == () and adamw.changed == ("optim.adamw.lr", "optim.kind")
    assert changed_keys(hybrid.cfg, adamw.cfg) == adamw.changed
    # The fixed budget: 6,144 tokens = 12 steps of 512 for every arm.
    assert {a.cfg.train.steps for a in plan.arms} == {12} and plan.base.train.steps == 12
    steps = {s.key: s for s in plan.steps}
    assert list(steps) == ["data", "hybrid.train", "hybrid.eval", "hybrid.export", "hybrid.report",
                           "adamw.train", "adamw.eval", "adamw.export", "adamw.report", "compare"]
    assert plan.arm_steps["hybrid"]["data"] is plan.arm_steps["adamw"]["data"] is steps["data"]
    assert plan.arm_steps["hybrid"]["train"].digest != plan.arm_steps["adamw"]["train"].digest
    assert len({s.digest for s in plan.steps}) == len(plan.steps)
    compare = plan.compare
    assert compare.stage == "report" and set(compare.inputs) == {"hybrid", "adamw"}
    assert compare.inputs["adamw"] is steps["adamw.report"]
    assert set(steps["adamw.report"].inputs) == {"train", "eval", "export"}
    # Deterministic, and an override for every arm changes every arm's training but not the data.
    again = build_ablation_plan("tiny")
    assert [s.digest for s in again.steps] == [s.digest for s in plan.steps]
    other = build_ablation_plan("tiny", overrides={"train.seed": 7})
    assert other.arm_steps["adamw"]["data"].digest == steps["data"].digest
    assert other.arm_steps["adamw"]["train"].digest != steps["adamw.train"].digest


def test_factorial_is_the_cross_product_of_levels():
    spec = tiny_spec(arms=None, factors={"optim.kind": ["hybrid", "adamw"],
                                         "routing": {"res": {"model.attn_res": True},
                                                     "plain": {"model.attn_res": False}}})
    assert list(expand_arms(load_spec(spec))) == ["kind-hybrid+res", "kind-hybrid+plain",
                                                  "kind-adamw+res", "kind-adamw+plain"]
    plan = build_ablation_plan(spec)
    changed = {a.name: a.changed for a in plan.arms}
    assert changed == {"kind-hybrid+res": (), "kind-hybrid+plain": ("model.attn_res",),
                       "kind-adamw+res": ("optim.kind",), "kind-adamw+plain": ("model.attn_res", "optim.kind")}
    assert len({a["data"].digest for a in plan.arm_steps.values()}) == 1
    assert len({a["train"].digest for a in plan.arm_steps.values()}) == 4
    assert [s.key for s in plan.steps].count("data") == 1
    assert set(plan.compare.inputs) == set(changed)
    sub = build_ablation_plan(spec, only=["kind-hybrid+res", "kind-adamw+plain"])
    assert [a.name for a in sub.arms] == ["kind-hybrid+res", "kind-adamw+plain"]
    with pytest.raises(ConfigError, match="unknown arm"):
        build_ablation_plan(spec, only=["kind-hybrid+res", "nope"])


def nca_spec(arms):
    return tiny_spec(nca="runs/nca-tiny", overrides={**tiny_spec()["overrides"], "train.init.mode": "nca_transfer"},
                     arms=arms)


def test_arms_with_the_same_nca_share_the_nca_chain():
    arms = {"nca-attnres": {}, "nca-only": {"model.attn_res": False},
            "attnres-fresh": {"train.init.mode": "scratch"}, "nca-seed": {"nca_run.train.seed": 3},
            "routing-reset": {"train.init.reset_attn_res": True}}
    plan = build_ablation_plan(nca_spec(arms))
    per = plan.arm_steps
    assert "nca_train" not in per["attnres-fresh"]
    # NCA world and data do not depend on the model: every NCA arm reuses them.
    for role in ("nca_search", "nca_data"):
        assert len({per[a][role].digest for a in arms if a != "attnres-fresh"}) == 1
    # model.* keys are mirrored into the NCA run (nca_transfer needs one layout), the vocabulary is not.
    nca_only = next(a for a in plan.arms if a.name == "nca-only")
    assert nca_only.nca_cfg.model.attn_res is False and nca_only.nca_cfg.model.vocab_size == 10002
    assert per["nca-only"]["nca_train"].digest != per["nca-attnres"]["nca_train"].digest
    assert per["nca-seed"]["nca_train"].digest != per["nca-attnres"]["nca_train"].digest
    assert per["nca-seed"]["nca_search"].digest == per["nca-attnres"]["nca_search"].digest
    assert per["nca-attnres"]["train"].inputs["init"] is per["nca-attnres"]["nca_train"]
    assert len({s.digest for s in plan.steps}) == len(plan.steps)
    keys = [s.key for s in plan.steps]
    assert keys.count("data") == 1 and any(re.fullmatch(r"nca_search\[.*nca-only.*\]", k) for k in keys)
    # the routing-reset control reuses the published recipe's NCA training: same digest, trained once
    assert per["routing-reset"]["nca_train"] is per["nca-attnres"]["nca_train"]
    assert per["routing-reset"]["train"].digest != per["nca-attnres"]["train"].digest


def _matrix_arms_match_run_configs(names):
    plan = build_ablation_plan("kotodama-matrix", only=names)
    steps = {a.cfg.train.steps for a in plan.arms}
    assert steps == {2861} and 2861 * 2_097_152 <= 6_000_000_000 < 2862 * 2_097_152
    for arm in plan.arms:
        file_cfg = load_config(CONFIGS_ROOT / f"runs/matrix-{arm.name}.yaml")
        assert file_cfg.preset == "proxy-108m" and file_cfg.model.num_layers == 28
        assert changed_keys(file_cfg, arm.cfg) == (), arm.name
    per = plan.arm_steps
    assert len({per[a]["data"].digest for a in per}) == 1
    return plan


def test_kotodama_matrix_arms_are_the_report_cells():
    plan = _matrix_arms_match_run_configs(MATRIX[:5])
    cfg = {a.name: a.cfg for a in plan.arms}
    assert (cfg["p1-adamw"].optim.kind, cfg["p1-adamw"].optim.adamw.lr) == ("adamw", 8e-4)
    assert (cfg["p3-muon"].optim.kind, cfg["p3-muon"].optim.muon.lr, cfg["p3-muon"].optim.adamw.lr) == \
        ("hybrid", 0.02, 6e-4)
    assert not any(cfg[a].model.attn_res for a in ("p1-adamw", "p3-muon", "nca-only"))
    assert cfg["attnres-fresh"].model.attn_res_boundaries == [0, 3, 7, 12, 21, 25]
    assert {a: cfg[a].train.init.mode for a in cfg} == {
        "nca-attnres": "nca_transfer", "p1-adamw": "scratch", "p3-muon": "scratch", "nca-only": "nca_transfer",
        "attnres-fresh": "scratch"}
    nca = {a.name: a.nca_cfg for a in plan.arms if a.nca_cfg}
    assert nca["nca-attnres"].model.attn_res and not nca["nca-only"].model.attn_res
    assert nca["nca-attnres"].train.steps == 6500 and nca["nca-attnres"].nca.seed == 17


def test_kotodama_matrix_routing_reset_control():
    plan = _matrix_arms_match_run_configs(MATRIX)
    per = plan.arm_steps
    assert per["nca-routing-reset"]["nca_train"] is per["nca-attnres"]["nca_train"]
    reset = next(a for a in plan.arms if a.name == "nca-routing-reset")
    assert reset.changed == ("train.init.reset_attn_res",)
    assert sum(s.stage == "train" for s in plan.steps) == 6 + 2  # six arms, two NCA trainings


# -- a tiny CPU ablation, run through the flow -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_ablation_trains_both_arms_compares_them_and_reruns_cached(shared_data, home, monkeypatch, tmp_path):
    pytest.importorskip("prefect")
    from prefect.testing.utilities import prefect_test_harness

    from flows.ablation_flow import ablation
    from kotodama_core.artifacts import code_version

    monkeypatch.setenv("KOTODAMA_CODE_VERSION", "ablation-test")  # the stages' digests equal the plan's
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code_version.cache_clear()
    try:
        with prefect_test_harness(server_startup_timeout=120):
            first = ablation("tiny")
            logs = {p: p.stat().st_mtime_ns for p in (home / "logs").iterdir()}
            second = ablation("tiny")
    finally:
        code_version.cache_clear()
    assert first["arms"] == ["hybrid", "adamw"]
    assert set(first["states"].values()) == {"Completed"}, first["states"]
    assert set(second["states"].values()) == {"Cached"}, second["states"]
    assert {p: p.stat().st_mtime_ns for p in (home / "logs").iterdir()} == logs  # no stage process started

    plan = build_ablation_plan("tiny")
    for arm in ("hybrid", "adamw"):
        m = json.loads(plan.arm_steps[arm]["train"].manifest.read_text())
        assert m["metrics"]["steps"] == 12 and m["metrics"]["tokens_seen"] == 6144
    page = plan.compare.out / "compare.html"
    assert first["compare_page"] == str(page) and page.is_file()
    text = page.read_text()
    assert "<th>hybrid</th>" in text and "<th>adamw</th>" in text
    for label in ("val bits/byte", "tokens/s", "model file bytes", "quantized artifact bytes", "Stable rank",
                  "BOS mass"):
        assert label in text, label
    summaries = json.loads((plan.compare.out / "summary.json").read_text())
    assert [s["name"] for s in summaries] == ["hybrid", "adamw"]
    for s in summaries:
        h = s["headline"]
        assert h["tokens_seen"] == 6144 and h["tokens_per_s"] > 0 and h["val_bpb"] > 0
        assert 0 < h["quant_bytes"] < h["model_bytes"]
        assert s["profiles"]["stable_rank"]["q_proj"]  # geometric metrics reached the comparison
    assert os.path.isfile(plan.arm_steps["adamw"]["report"].out / "report.html")
