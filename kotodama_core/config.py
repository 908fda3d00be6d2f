"""Run configs: the strict schema over a config tree (kotodama_core.config_tree reads the YAML).

A run config is one YAML mapping whose top-level keys are sections (model, data, nca, optim, schedule,
train, eval, report, export). Unknown keys anywhere are errors.
"""

from __future__ import annotations

import difflib
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
from kotodama_core.config_tree import (CONFIGS_ROOT, apply_overrides, deep_merge, load_tree,  # noqa: F401
                                       parse_override, parse_overrides, read_yaml_mapping)
from kotodama_core.digest import canonical_json, digest  # noqa: F401 - re-exported
from kotodama_core.schema import ConfigError, StrictModel
from kotodama_core.train.config import TrainConfig


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


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys a config section accepts at `loc` (the path of the offending key's parent)."""
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    """One line per problem, naming the dotted key; an unknown key gets its nearest known neighbour."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(tuple(err["loc"][:-1])), n=1)
            hint = f" (did you mean {'.'.join([*map(str, err['loc'][:-1]), near[0]])!r}?)" if near else ""
            lines.append(f"unknown config key {loc!r}{hint}")
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


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
