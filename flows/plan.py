"""Pipelines as plans: which stages run, with which resolved config, inputs and digest — before anything runs.

A plan is a list of `Step`s in run order. Every step's digest is the stage digest of the contract
(stage name, the stage module's `config_section(cfg)`, the digests of its inputs, code
version), predicted from the configs alone: an upstream step's digest is what its manifest will hold, and
an input that is a file outside the pipeline (a `.pt.zst` checkpoint) counts by its sha256, as the train
stage counts it. So the artifact folder, the Prefect cache key and "what must rerun" are all known up front.

Run configs live in configs/runs: `<pipeline>.yaml` is the published recipe (preset `proxy-108m`),
`<pipeline>-<preset>.yaml` a scaled variant (e.g. `fullcorpus-tiny.yaml`). Chains that contain NCA
pre-pretraining read the NCA part from `nca[-<preset>].yaml`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kotodama_core.artifacts import MANIFEST, artifact_dir, read_manifest, sha256_file, stage_digest
from kotodama_core.config import CONFIGS_ROOT, ConfigError, RunConfig, apply_overrides, load_tree, validate

PIPELINES = ("fullcorpus", "bcpt", "nca")
DEFAULT_PRESET = "proxy-108m"
RUNS_DIR = CONFIGS_ROOT / "runs"


@dataclass(frozen=True)
class Step:
    """One stage invocation: `python -m stages.<stage> --config <config_path> --out <out> --input k=v`."""

    key: str
    stage: str
    cfg: RunConfig
    inputs: Mapping[str, "Step | Path"]
    digest: str
    config_section: dict[str, Any] = field(repr=False)

    @property
    def out(self) -> Path:
        return artifact_dir(self.stage, self.digest)

    @property
    def config_path(self) -> Path:
        """The resolved config, written beside the artifact folder."""
        return self.out.with_name(self.out.name + ".config.yaml")

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST

    def input_paths(self) -> dict[str, Path]:
        return {k: (v.out if isinstance(v, Step) else v) for k, v in self.inputs.items()}

    @property
    def is_training(self) -> bool:
        return self.stage == "train"


def run_config_path(pipeline: str, preset: str) -> Path:
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    name = pipeline if preset == DEFAULT_PRESET else f"{pipeline}-{preset}"
    path = RUNS_DIR / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in RUNS_DIR.glob(f"{pipeline}*.yaml"))
        raise ConfigError(f"no run config {path} for pipeline {pipeline!r} with preset {preset!r} "
                          f"(configs/runs has: {', '.join(have) or 'nothing'})")
    return path


def resolve(pipeline: str, preset: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a run config, apply dotted overrides ({"eval.limit": 8}) and validate strictly."""
    path = run_config_path(pipeline, preset)
    overrides = dict(overrides or {})
    for key in overrides:
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"override key {key!r} must be dotted, like 'train.steps'")
    tree = apply_overrides(load_tree(path), overrides)
    origin = f"{path.name}" + (f" with overrides {sorted(overrides)}" if overrides else "")
    return validate(tree, origin=origin)


def stage_module(stage: str):
    try:
        return importlib.import_module(f"stages.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name == f"stages.{stage}":
            raise ConfigError(f"stage module stages.{stage} does not exist yet") from None
        raise


def stage_available(stage: str) -> bool:
    return importlib.util.find_spec(f"stages.{stage}") is not None


def _input_digest(value: "Step | Path") -> str:
    if isinstance(value, Step):
        return value.digest
    value = Path(value)
    if value.is_file() and value.name != MANIFEST:
        return sha256_file(value)
    return read_manifest(value).digest


def stage_config(stage: str, cfg: RunConfig) -> dict[str, Any]:
    """The config the stage folds into its digest: its module's `config_section(cfg)`."""
    section = getattr(stage_module(stage), "config_section", None)
    if section is None:
        raise ConfigError(f"stages.{stage} does not define config_section(cfg) (what its digest covers)")
    return section(cfg)


def make_step(key: str, stage: str, cfg: RunConfig, inputs: Mapping[str, "Step | Path"]) -> Step:
    section = stage_config(stage, cfg)
    digest = stage_digest(stage, section, {k: _input_digest(v) for k, v in inputs.items()})
    return Step(key=key, stage=stage, cfg=cfg, inputs=dict(inputs), digest=digest, config_section=section)


def nca_steps(cfg: RunConfig) -> list[Step]:
    """Rule search → NCA token data → NCA training (→ boundary derivation, when that stage exists)."""
    rules = make_step("nca_search", "nca_search", cfg, {})
    data = make_step("nca_data", "nca_data", cfg, {"rules": rules})
    train = make_step("nca_train", "train", cfg, {"data": data})
    steps = [rules, data, train]
    if stage_available("boundaries"):
        steps.append(make_step("boundaries", "boundaries", cfg, {"checkpoint": train, "data": data}))
    return steps


def eval_report_steps(cfg: RunConfig, train: Step, data: Step, extra: Mapping[str, Step] = {}) -> list[Step]:
    ev = make_step("eval", "eval", cfg, {"checkpoint": train, "data": data})
    rep = make_step("report", "report", cfg, {"train": train, "eval": ev, **extra})
    return [ev, rep]


def _check_init_mode(cfg: RunConfig, want: str, origin: str) -> None:
    if cfg.train.init.mode != want:
        raise ConfigError(f"{origin}: train.init.mode must be {want!r} here, got {cfg.train.init.mode!r}")


def fullcorpus_steps(cfg: RunConfig, nca_cfg: RunConfig) -> list[Step]:
    """data + the NCA chain → fullcorpus training initialised by nca_transfer → eval → report."""
    _check_init_mode(cfg, "nca_transfer", "fullcorpus")
    nca = nca_steps(nca_cfg)
    nca_train = next(s for s in nca if s.key == "nca_train")
    data = make_step("data", "data", cfg, {})
    train = make_step("train", "train", cfg, {"data": data, "init": nca_train})
    extra = {s.key: s for s in nca if s.key in ("nca_train", "boundaries")}
    return [data, *nca, train, *eval_report_steps(cfg, train, data, extra)]


def bcpt_steps(cfg: RunConfig, init: Path) -> list[Step]:
    """books data → training initialised (weights only) from `init` → eval → report."""
    _check_init_mode(cfg, "weights", "bcpt")
    data = make_step("data", "data", cfg, {})
    train = make_step("train", "train", cfg, {"data": data, "init": init})
    return [data, train, *eval_report_steps(cfg, train, data)]


def downstream_of(steps: list[Step], key: str) -> set[str]:
    """Keys of the steps that (transitively) read the output of step `key`, itself included."""
    found = {key}
    for s in steps:
        if any(isinstance(v, Step) and v.key in found for v in s.inputs.values()):
            found.add(s.key)
    return found
