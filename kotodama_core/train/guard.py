"""Guarded resume: a work folder, and every checkpoint in it, belongs to one run identity.

The identity is what makes two runs the same run: the config sections that enter the training stage's
digest (model, optim, schedule, train) and the digests of its inputs. `<out>.partial/run.json` records it
when a run starts, and every checkpoint carries its digest, so a rerun with another config or other data
refuses to resume the other run's state, naming the keys that differ, instead of silently mixing them.
A key added to the config after a run was recorded counts only when it is set away from its schema
default, so a run resumes under newer code that added keys it never used. The EXECUTION_KEYS never count:
they choose how a step is executed, not what it computes, so a run can resume with another of them (say,
without the CUDA graph whose capture failed, or with the faster-compiling scope after a crash).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kotodama_core.digest import digest
from kotodama_core.errors import UserError

RUN_FILE = "run.json"
TRAIN_SECTIONS = ("model", "optim", "schedule", "train")
_MAX_NAMED = 8
# How the step runs, not what it computes: compiled or not, at which scope, replayed from a CUDA graph,
# checkpoints written in the background, how often progress prints.
EXECUTION_KEYS = frozenset({"train.compile", "train.compile_scope", "train.cuda_graph", "train.async_checkpoint",
                            "train.progress_every_s"})


class ResumeRefused(UserError, RuntimeError):
    """The work folder or checkpoint was written by another run (config or inputs differ)."""


def run_identity(sections: Mapping[str, Any], inputs: Mapping[str, str]) -> dict[str, Any]:
    """{"config": the training config sections, "inputs": name -> input digest} as plain JSON values."""
    return json.loads(json.dumps({"config": dict(sections), "inputs": dict(sorted(inputs.items()))}, default=str))


def identity_digest(identity: Mapping[str, Any]) -> str:
    return digest(identity)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"train": {"steps": 8}} -> {"train.steps": 8}."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


_UNSET = "<unset>"


def _values(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity's config as dotted keys, and its inputs as `input <name>`."""
    values = flatten(identity.get("config", {}))
    values.update({f"input {k}": v for k, v in identity.get("inputs", {}).items()})
    return values


def schema_defaults() -> dict[str, Any]:
    """Every key of the identity's config sections at its schema default, as dotted keys (identity form)."""
    from kotodama_core.model.config import KotodamaConfig
    from kotodama_core.optim.config import OptimConfig, ScheduleConfig
    from kotodama_core.train.config import TrainConfig

    schemas = {"model": KotodamaConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig}
    assert tuple(schemas) == TRAIN_SECTIONS
    sections = {name: schema().model_dump(mode="json") for name, schema in schemas.items()}
    return flatten(run_identity(sections, {})["config"])


def material_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The keys (dotted config keys, inputs as `input <name>`) whose values differ between two identities,
    sorted, less the EXECUTION_KEYS and the keys `old` does not record that `new` holds at their schema
    default: keys added to the config after `old` was written, whose default is what that run used. A new
    key set to anything else is a difference."""
    a, b = _values(old), _values(new)
    ignore = _added_at_default(old, new) | EXECUTION_KEYS
    return [k for k in sorted((set(a) | set(b)) - ignore) if a.get(k, _UNSET) != b.get(k, _UNSET)]


def _added_at_default(old: Mapping[str, Any], new: Mapping[str, Any]) -> frozenset[str]:
    recorded = flatten(old.get("config", {}))
    added = {k: v for k, v in flatten(new.get("config", {})).items() if k not in recorded}
    defaults = schema_defaults() if added else {}
    return frozenset(k for k, v in added.items() if k in defaults and v == defaults[k])


def resume_overrides(old: Mapping[str, Any], keys: list[str]) -> list[str] | None:
    """`key=value` overrides that set the differing `keys` back to what `old` ran with (a key `old` does not
    record ran at its schema default), or None where they cannot: an input differs, or a value is not a
    scalar."""
    recorded = flatten(old.get("config", {}))
    defaults = schema_defaults() if any(k not in recorded for k in keys) else {}
    overrides = []
    for key in keys:
        value = recorded[key] if key in recorded else defaults.get(key, _UNSET)
        if key.startswith("input ") or value is _UNSET or not isinstance(value, (str, int, float, bool)):
            return None
        overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return overrides or None


def refusal(what: str, old: Mapping[str, Any], new: Mapping[str, Any], fresh: str, keys: list[str]) -> str:
    """One line: what was written by another run, the differing `keys` as `key: old -> new` (a missing side
    shows as <unset>), how to start fresh, and the overrides that give the run its own settings where
    they can."""
    a, b = _values(old), _values(new)
    diffs = [f"{k}: {a.get(k, _UNSET)} -> {b.get(k, _UNSET)}" for k in keys]
    named = "; ".join(diffs[:_MAX_NAMED]) + (f"; and {len(diffs) - _MAX_NAMED} more" if len(diffs) > _MAX_NAMED else "")
    overrides = resume_overrides(old, keys)
    keep = f"; its own settings: --set {' '.join(overrides)}" if overrides else ""
    return f"{what} was written by another run ({named}); {fresh}{keep}"


def refuse_other_run(what: str, recorded: Mapping[str, Any], identity: Mapping[str, Any], fresh: str) -> None:
    """Raise ResumeRefused (naming the keys) when `recorded` and `identity` differ materially
    (material_keys); an identity that differs only by keys added at their defaults passes."""
    keys = material_keys(recorded, identity)
    if keys:
        raise ResumeRefused(refusal(what, recorded, identity, fresh, keys))


def fresh_hint(work: Path) -> str:
    out = work.with_name(work.name.removesuffix(".partial"))
    return f"to start fresh remove {work} or choose another --out than {out}"


def claim_work_folder(work: Path, identity: Mapping[str, Any]) -> None:
    """Write `work/run.json` for `identity`, or refuse when the folder holds another run's identity."""
    path = work / RUN_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError:
            recorded = None
        if not isinstance(recorded, dict) or "identity" not in recorded:
            raise ResumeRefused(f"{path} is unreadable, so this work folder cannot be resumed safely; "
                                f"{fresh_hint(work)}")
        if recorded.get("digest") != identity_digest(identity):
            refuse_other_run(str(work), recorded["identity"], identity, fresh_hint(work))
        return
    work.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"digest": identity_digest(identity), "identity": identity}, indent=2,
                              allow_nan=False))
    os.replace(tmp, path)


def check_checkpoint(state: Mapping[str, Any], identity: Mapping[str, Any], where: str, work: Path) -> None:
    """Refuse a checkpoint whose recorded run identity is not `identity` (checkpoints written before
    identities were recorded are compared on their config sections)."""
    recorded = state.get("run_identity")
    if recorded is None:
        config = state.get("config")
        if not isinstance(config, Mapping):
            return  # nothing recorded to compare with
        # Written before run identities: compare the config sections it recorded.
        legacy, current = {"config": {s: config.get(s) for s in TRAIN_SECTIONS}}, {"config": identity.get("config", {})}
        refuse_other_run(where, legacy, current, fresh_hint(work))
        return
    if identity_digest(recorded) != identity_digest(identity):
        refuse_other_run(where, recorded, identity, fresh_hint(work))
