"""Run configs: strict YAML with `extends:`, dotted CLI overrides, and a content digest.

A run config is one YAML mapping whose top-level keys are sections (model, data, nca, optim, schedule,
train, eval, report). `extends:` names files whose trees are deep-merged underneath this one (later
entries win, this file wins over all); names resolve against the file's own folder, then against the
configs root, with or without `.yaml`. Unknown keys anywhere are errors.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from kotodama_core.data.config import DataConfig
from kotodama_core.eval.config import EvalConfig, ReportConfig
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.nca.config import NCAConfig
from kotodama_core.optim.config import OptimConfig, ScheduleConfig
from kotodama_core.quant.config import ExportConfig
from kotodama_core.schema import StrictModel
from kotodama_core.train.config import TrainConfig

CONFIGS_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key and the file."""


class RunConfig(StrictModel):
    name: str = "run"
    preset: str = "custom"
    model: KotodamaConfig = KotodamaConfig()
    data: DataConfig = DataConfig()
    nca: NCAConfig = NCAConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    report: ReportConfig = ReportConfig()
    export: ExportConfig = ExportConfig()

    def section(self, name: str) -> dict[str, Any]:
        """The resolved section as plain JSON-able data."""
        if name not in type(self).model_fields:
            raise ConfigError(f"unknown config section {name!r}")
        value = getattr(self, name)
        return value.model_dump(mode="json") if isinstance(value, StrictModel) else value


def _resolve_extends(name: str, base_dir: Path) -> Path:
    candidates = []
    for root in (base_dir, CONFIGS_ROOT):
        p = root / name
        candidates += [p, p.with_name(p.name + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"extends: {name!r} not found (looked in {base_dir} and {CONFIGS_ROOT})")


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `top` over `base`; mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """One YAML file whose top level must be a mapping; errors name the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def load_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and everything it extends into one merged mapping."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"extends cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    tree = read_yaml_mapping(path)
    parents = tree.pop("extends", []) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_tree(_resolve_extends(parent, path.parent), _seen + (path,)))
    return deep_merge(merged, tree)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=100` -> (["train", "steps"], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return parts, value


def parse_overrides(texts: Iterable[str]) -> dict[str, Any]:
    """["a.b=v", ...] -> {"a.b": v, ...} (values parsed as YAML; a later key wins)."""
    return {".".join(parts): value for parts, value in map(parse_override, texts)}


def apply_overrides(tree: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides (strings `a.b=v` or a mapping {"a.b": v}) to a config tree."""
    out = copy.deepcopy(dict(tree))
    items = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in items.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(parts)}: {p!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {loc!r}")
        else:
            lines.append(f"{loc}: {err['msg']}")
    return f"{origin}: " + "; ".join(lines)


def validate(tree: Mapping[str, Any], origin: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(dict(tree))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def load_config(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] = ()) -> RunConfig:
    """Load, merge `extends:`, apply overrides and validate strictly."""
    tree = apply_overrides(load_tree(path), overrides)
    return validate(tree, origin=str(path))


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def digest(obj: Any) -> str:
    """sha256 hex of the canonical JSON of `obj` (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
