"""Config trees: YAML files with `extends:`, deep merge and dotted overrides, before any validation.

`extends:` names files whose trees are deep-merged underneath this one (later entries win, this file wins
over all); names resolve against the file's own folder, then against the configs root, with or without
`.yaml`. This module knows no schema, so every package can read a config file without importing the run
config (which imports them all).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from kotodama_core.schema import ConfigError

CONFIGS_ROOT = Path(__file__).resolve().parent.parent / "configs"


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


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: dotted keys, the way overrides name them; lists and empty mappings
    stay values."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree} if prefix else {}
