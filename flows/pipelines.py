"""The deployed pipelines from the flow's parameters: `fullcorpus`, `bcpt` and `nca` (stages/graph.py).

No Prefect here: `build_plan` resolves the run configs, applies overrides, finds and checks the bcpt source
checkpoint (a path, an MLflow run, or the preset's fullcorpus artifact), and returns the steps with their
digests, or raises before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.preflight import artifact_from_mlflow_run, check_fits_model
from kotodama_core.artifacts import ArtifactError
from kotodama_core.config import ConfigError
from stages.graph import Step, plan, resolve


def build_plan(pipeline: str, preset: str, overrides: dict[str, Any] | None = None,
               nca_overrides: dict[str, Any] | None = None, init_checkpoint: str | None = None,
               init_run_id: str | None = None, init_step: int | None = None) -> list[Step]:
    """Every step of the pipeline with its digest; all config and input errors surface here."""
    overrides = dict(overrides or {})
    if (init_checkpoint or init_run_id or init_step is not None) and pipeline != "bcpt":
        raise ConfigError("init_checkpoint / init_run_id / init_step apply to the bcpt pipeline only")
    if pipeline != "bcpt":
        return plan(pipeline, preset, overrides, nca_overrides)
    if init_checkpoint and init_run_id:
        raise ConfigError("give init_checkpoint or init_run_id, not both")
    if init_step is not None:
        overrides["train.init.step"] = init_step
    cfg = resolve("bcpt", preset, overrides)
    if init_checkpoint:
        source = Path(init_checkpoint).expanduser().resolve()
    elif init_run_id:
        source = artifact_from_mlflow_run(init_run_id)
    else:
        source = default_bcpt_source(preset)
    from kotodama_core.train.checkpoint import has_manifest, init_checkpoint_file

    file = init_checkpoint_file(source, cfg.train.init.step)
    check_fits_model(file, cfg)
    # A folder of the original code's checkpoints has no manifest: the run counts the chosen file.
    return plan("bcpt", preset, overrides, init=source if has_manifest(source) else file)


def same_section(old: Any, current: dict[str, Any]) -> bool:
    """Whether a finished training artifact's config section is `current`, once the keys the schema gained
    since it was made are filled with their defaults (a new key at its default changes no training)."""
    if old == current:
        return True
    if not isinstance(old, dict):
        return False
    from kotodama_core.config import validate
    from stages.registry import config_section

    try:
        return config_section("train", validate(old, origin="a training artifact's manifest")) == current
    except ConfigError:  # a key the schema no longer knows, or a value it refuses: not this config
        return False


def default_bcpt_source(preset: str) -> Path:
    """The `preset` fullcorpus training artifact: the one the current code would produce, else the newest
    one trained with the same config (the code changed since), else an error saying what to run."""
    fc_train = next(s for s in build_plan("fullcorpus", preset) if s.key == "train")
    if fc_train.manifest.is_file():
        return fc_train.out
    same_config = []
    for manifest in fc_train.out.parent.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        if data.get("stage") == "train" and same_section(data.get("config"), fc_train.config_section):
            same_config.append((manifest.stat().st_mtime, manifest.parent))
    if same_config:
        return max(same_config)[1]
    raise ArtifactError(f"bcpt starts from the {preset} fullcorpus run's checkpoint, but there is no such training "
                        f"artifact under {fc_train.out.parent}: run the fullcorpus deployment first, or pass "
                        f"init_checkpoint / init_run_id")
