"""Checks that run before any stage: the bcpt source checkpoint exists and fits the model.

The source is a path (a training artifact folder or a `.pt.zst` file), or an MLflow run id (a flow's
parent run or its `train` stage run) plus a step; by default the same preset's fullcorpus training
artifact at the bcpt config's `train.init.step` (the step-72000 milestone in the published recipe).
"""

from __future__ import annotations

from pathlib import Path

from kotodama_core.artifacts import MANIFEST, ArtifactError, read_manifest
from kotodama_core.config import ConfigError, RunConfig

ARTIFACT_TAG = "kotodama.artifact_dir"
STEP_TAG = "kotodama.step"


def artifact_from_mlflow_run(run_id: str) -> Path:
    """The training artifact folder recorded on an MLflow run (or on the `train` child of a parent run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"init_run_id {run_id!r}: no such MLflow run ({exc.message})") from None
    if run.data.tags.get(STEP_TAG) != "train":
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`{STEP_TAG}` = 'train'")
        if not children:
            raise ConfigError(f"init_run_id {run_id!r} is neither a train stage run nor a parent of one")
        run = children[0]
    folder = run.data.tags.get(ARTIFACT_TAG)
    if not folder:
        raise ConfigError(f"MLflow run {run.info.run_id} has no {ARTIFACT_TAG} tag")
    return Path(folder)


def checkpoint_file(source: Path, step: int | None) -> Path:
    """The file a training run initialised from `source` at `step` will read; clear errors if absent."""
    from kotodama_core.train.checkpoint import artifact_weights

    source = Path(source).expanduser()
    if source.is_file() and source.name != MANIFEST:
        return source
    if not source.exists():
        raise ArtifactError(f"init checkpoint {source} does not exist")
    manifest = read_manifest(source)
    if manifest.stage != "train":
        raise ArtifactError(f"{source} is a {manifest.stage!r} artifact, not a training artifact")
    return artifact_weights(manifest.root, step)


def check_fits_model(path: Path, cfg: RunConfig) -> None:
    """The checkpoint's tensors have exactly the names and shapes of `cfg.model` (built on the meta device)."""
    from kotodama_core.model import KotodamaLM
    from kotodama_core.model.io import state_dict_mismatches
    from kotodama_core.train.init import read_weights

    weights = read_weights(path)
    model = KotodamaLM(cfg.model, device="meta")
    problems = state_dict_mismatches(weights, model)
    if problems:
        shown = "; ".join(problems[:4]) + (" …" if len(problems) > 4 else "")
        raise ConfigError(f"init checkpoint {path} does not fit the {cfg.preset} model: {shown}")
