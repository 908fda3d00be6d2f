"""Preflight: the bcpt source is found from an MLflow run, and a wrong source is refused by name."""

from __future__ import annotations

import pytest

from kotodama_core.artifacts import ArtifactError, write_manifest
from kotodama_core.config import ConfigError

pytest.importorskip("mlflow")


def test_the_train_artifact_of_a_parent_run_or_of_the_stage_run(tracking, tmp_path):
    from flows.preflight import ARTIFACT_TAG, STEP_TAG, artifact_from_mlflow_run

    client, exp = tracking
    parent = client.create_run(exp).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, STEP_TAG: "train",
                                         ARTIFACT_TAG: str(tmp_path / "train-art")}).info.run_id
    assert artifact_from_mlflow_run(child) == tmp_path / "train-art"
    assert artifact_from_mlflow_run(parent) == tmp_path / "train-art"
    lonely = client.create_run(exp).info.run_id
    with pytest.raises(ConfigError, match="neither a train stage run nor a parent of one"):
        artifact_from_mlflow_run(lonely)
    with pytest.raises(ConfigError, match="no such MLflow run"):
        artifact_from_mlflow_run("0" * 32)


def test_a_source_that_is_not_a_training_artifact_is_refused(tmp_path):
    from kotodama_core.train.checkpoint import init_checkpoint_file as checkpoint_file

    (tmp_path / "eval").mkdir()
    write_manifest(tmp_path / "eval", stage="eval", config={}, inputs={})
    with pytest.raises(ArtifactError, match="is a 'eval' artifact, not a training artifact"):
        checkpoint_file(tmp_path / "eval", 30)
    with pytest.raises(ArtifactError, match="does not exist"):
        checkpoint_file(tmp_path / "nowhere", 30)
    file = tmp_path / "weights.pt.zst"
    file.write_bytes(b"x")
    assert checkpoint_file(file, 30) == file


def test_bcpt_source_made_before_the_schema_gained_a_key(tmp_path, monkeypatch):
    """A fullcorpus training artifact whose manifest lacks a key added to the schema since (at its
    default) is still the preset's bcpt source; one trained with another value is not."""
    import copy

    from flows.pipelines import build_plan, default_bcpt_source, same_section

    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    fc_train = next(s for s in build_plan("fullcorpus", "tiny") if s.key == "train")
    older = copy.deepcopy(fc_train.config_section)
    older["train"].pop("async_checkpoint")  # a key this code has and that artifact's code had not
    assert same_section(older, fc_train.config_section)
    other = copy.deepcopy(fc_train.config_section)
    other["train"]["steps"] += 1
    assert not same_section(other, fc_train.config_section)
    assert not same_section({"train": {"no_such_key": 1}}, fc_train.config_section)
    with pytest.raises(ArtifactError, match="run the fullcorpus deployment first"):
        default_bcpt_source("tiny")
    folder = fc_train.out.parent / "made-by-older-code"
    folder.mkdir(parents=True)
    write_manifest(folder, stage="train", config=other, inputs={})
    with pytest.raises(ArtifactError, match="run the fullcorpus deployment first"):
        default_bcpt_source("tiny")
    write_manifest(folder, stage="train", config=older, inputs={})
    assert default_bcpt_source("tiny") == folder
