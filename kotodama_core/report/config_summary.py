"""What a run was: its name, preset, pipeline, digests, and the config keys that differ from its base.

The run's resolved config is the training artifact's config.yaml (the report stage's own config when there
is none). Its base is the run config file of the same name, configs/runs/<name>.yaml, resolved by the
current checkout: the keys whose values differ are the overrides that made this run (deployment
`overrides`, `--set` on a stage command line). An ablation arm is named `<ablation>.<arm>`; its base is
the `base:` run config of configs/ablations/<ablation>.yaml, so its overrides are the ablation's common
ones, the token budget's step count and the arm's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from kotodama_core.config_tree import flatten  # noqa: F401 - sections import it from here
from kotodama_core.digest import digest

# Keys that name a run rather than change what it computes.
NAMING_KEYS = ("name", "report.title")
TITLE_OVERRIDES = 3  # overrides spelled out in the title; the rest are counted


def read_run_config(train_dir: Path | None, notes: list[str]) -> dict[str, Any] | None:
    if train_dir is None:
        return None
    path = train_dir / "config.yaml"
    if not path.is_file():
        notes.append(f"{train_dir}: no config.yaml (the configuration shown is the report's own)")
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        notes.append(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
        return None
    return tree if isinstance(tree, dict) else None


def ablation_arm(name: str, configs_root: Path) -> tuple[str, str, Path] | None:
    """(ablation, arm, base run config path) when `name` is `<ablation>.<arm>` of configs/ablations/<ablation>.yaml."""
    spec_name, dot, arm = name.rpartition(".")
    spec = configs_root / "ablations" / f"{spec_name}.yaml"
    if not dot or not spec.is_file():
        return None
    try:
        base = (yaml.safe_load(spec.read_text()) or {}).get("base")
    except yaml.YAMLError:
        return None
    if not isinstance(base, str):
        return None
    path = configs_root / (base if base.endswith((".yaml", ".yml")) else f"{base}.yaml")
    return (spec_name, arm, path) if path.is_file() else None


def base_config(name: str, configs_root: Path, notes: list[str]) -> tuple[Path | None, dict[str, Any] | None]:
    """The run's base config resolved (extends merged, defaults filled): configs/runs/<name>.yaml, or an
    ablation arm's base run config; (None, None) when there is none."""
    from kotodama_core.config import ConfigError, load_config

    path = configs_root / "runs" / f"{name}.yaml"
    if not path.is_file():
        arm = ablation_arm(name, configs_root)
        if arm is None:
            return None, None
        path = arm[2]
    try:
        return path, load_config(path).model_dump(mode="json")
    except ConfigError as exc:
        notes.append(f"base config {path} does not load with this checkout: {str(exc).splitlines()[0]}")
        return path, None


def config_differences(base: Mapping[str, Any], run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{key, base, value}] for every dotted key of `run` whose value differs from `base` (naming keys aside).

    Keys only the base has are left out: they are defaults added to the code after the run was made."""
    a, b = flatten(base), flatten(run)
    return [{"key": k, "base": a.get(k), "value": b[k]} for k in sorted(b)
            if k not in NAMING_KEYS and (k not in a or a[k] != b[k])]


def pipeline_of(name: str, preset: str) -> str:
    """fullcorpus-tiny with preset tiny -> fullcorpus (configs/runs names scaled variants <pipeline>-<preset>)."""
    suffix = f"-{preset}"
    return name[: -len(suffix)] if preset and name.endswith(suffix) and len(name) > len(suffix) else name


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    return text if len(text) <= 40 else text[:37] + "..."


def run_title(name: str, preset: str, overrides: list[dict[str, Any]], arm: tuple[str, str] | None = None) -> str:
    """`fullcorpus · tiny · optim.muon.lr=0.03`: pipeline, preset, then the overrides that made the run;
    an ablation arm is `tiny ablation · arm adamw · tiny` (its overrides are listed in the config section)."""
    if arm is not None:
        return " · ".join([f"{arm[0]} ablation", f"arm {arm[1]}", *([preset] if preset != "custom" else [])])
    parts = [pipeline_of(name, preset)]
    if preset and preset != "custom":
        parts.append(preset)
    shown = [f"{o['key']}={_short(o['value'])}" for o in overrides[:TITLE_OVERRIDES]]
    if len(overrides) > TITLE_OVERRIDES:
        shown.append(f"+{len(overrides) - TITLE_OVERRIDES} more")
    if shown:
        parts.append(", ".join(shown))
    return " · ".join(parts)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def config_summary(run_config: dict[str, Any], train_manifest: dict[str, Any] | None, configs_root: Path,
                   notes: list[str]) -> dict[str, Any]:
    """Name, preset, pipeline, digests, code version, base file and overrides of one run, and its title."""
    name = str(run_config.get("name") or "run")
    preset = str(run_config.get("preset") or "custom")
    base_path, base = base_config(name, configs_root, notes)
    overrides = config_differences(base, run_config) if base is not None else []
    arm = ablation_arm(name, configs_root) if not (configs_root / "runs" / f"{name}.yaml").is_file() else None
    manifest = train_manifest or {}
    return {
        "name": name, "preset": preset, "pipeline": "ablation" if arm else pipeline_of(name, preset),
        "ablation": {"name": arm[0], "arm": arm[1]} if arm else None,
        "title": run_title(name, preset, overrides, arm[:2] if arm else None),
        "config_digest": digest(run_config),
        "train_digest": manifest.get("digest"),
        "code_version": manifest.get("code_version"),
        "base_path": _relative(base_path, configs_root.parent) if base_path is not None else None,
        "base_found": base is not None,
        "overrides": overrides,
    }
