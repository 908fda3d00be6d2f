"""Checks that run before any stage: the machine can run the preset, the tokenizers can be loaded, and
the bcpt source checkpoint exists and fits the model.

`check_environment`: a preset that needs a GPU (`PRESETS`) is refused on a machine without CUDA, and a
tokenizer given as a hub name is refused while HF_HUB_OFFLINE is set and the hub cache has no copy.

The source is a path (a training artifact folder or a `.pt.zst` file), or an MLflow run id (a flow's
parent run or its `train` stage run) plus a step; by default the same preset's fullcorpus training
artifact at the bcpt config's `train.init.step` (the step-72000 milestone in the published recipe).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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


# The presets a deployment offers (the Prefect UI shows them as a choice): what each is for, and whether it
# needs a GPU. `tiny` is the default: forgetting to pick a preset must never start a run that cannot finish.
PRESETS: dict[str, tuple[str, bool]] = {
    "tiny": ("2-core CPU demo: a 4-layer model, minutes end to end", False),
    "proxy-108m": ("the model card's 108M recipes (configs/runs/<pipeline>.yaml): needs CUDA GPUs", True),
}
PRESET_HELP = "; ".join(f"{name}: {text}" for name, (text, _) in PRESETS.items())
_TRUE = {"1", "true", "yes", "on"}
# `org/name` (or `name`) as the hub spells a repository; a path has more parts, a dot start or .json.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _tokenizer_keys(step) -> list[tuple[str, str | None, Path | None]]:
    """(config key, value, folder relative paths resolve against) of the tokenizers a step loads."""
    cfg = step.cfg
    if step.stage == "data":
        return [("data.tokenizer", cfg.data.tokenizer, cfg.data.root())]
    if step.stage == "eval":
        from kotodama_core.data.config import REPO_ROOT

        keys = [("eval.tokenizer", cfg.eval.tokenizer, REPO_ROOT)]
        if cfg.eval.val_bpb.enabled:
            keys.append(("eval.val_bpb.tokenizer", cfg.eval.val_bpb.tokenizer, REPO_ROOT))
        return keys
    return []


def check_environment(preset: str, steps, *, gpu: bool | None = None, offline: bool | None = None) -> None:
    """Refuse, before any stage runs, what cannot finish here: a GPU preset on a machine without CUDA, and
    a tokenizer given as a hub name while HF_HUB_OFFLINE is set and the hub cache has no copy of it (or a
    local tokenizer path that does not exist). One ConfigError naming the preset, the key and the fix."""
    from kotodama_core.data.tokenizer import TokenizerError, tokenizer_file

    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is unknown; choose one of: {PRESET_HELP}")
    needs_gpu = PRESETS[preset][1]
    if needs_gpu and not (_gpu_available() if gpu is None else gpu):
        raise ConfigError(f"preset {preset!r} needs a CUDA GPU and this machine has none; "
                          f"run it on a GPU worker, or pick preset=tiny for the CPU demo")
    offline = _offline() if offline is None else offline
    for step in steps:
        for key, value, root in _tokenizer_keys(step):
            if not value:
                continue
            text = str(value)
            local = Path(text).expanduser()
            local = local if local.is_absolute() or root is None else root / local
            if _HUB_ID.fullmatch(text) and not local.exists():
                if offline and not _hub_cached(text):
                    raise ConfigError(
                        f"preset {preset!r}, step {step.key}: {key} is the hub name {text!r} while HF_HUB_OFFLINE "
                        f"is set and the hub cache has no copy; set overrides {{\"{key}\": "
                        f"\"/path/to/tokenizer.json\"}} or unset HF_HUB_OFFLINE")
                continue
            try:
                tokenizer_file(text, root)
            except TokenizerError as exc:
                raise ConfigError(f"preset {preset!r}, step {step.key}: {key} = {text!r}: {exc}; set "
                                  f"overrides {{\"{key}\": \"/path/to/tokenizer.json\"}}") from None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "tokenizer.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False
