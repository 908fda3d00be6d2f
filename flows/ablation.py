"""Ablations as plans: a base run config, arms (one factor changed each) or a small factorial, at one budget.

An ablation spec is a YAML file in configs/ablations/ (validated strictly: an unknown key is an error):

    name: tiny                        # labels the comparison report and the MLflow parent run
    description: free text
    base: runs/fullcorpus-tiny        # the language run config every arm starts from (relative to configs/)
    nca: runs/nca-tiny                # the NCA run config of arms with train.init.mode nca_transfer
    token_budget: 6144                # every arm trains floor(token_budget / global_batch_tokens) steps
    overrides: {eval.limit: 8}        # dotted overrides applied to every arm
    nca_overrides: {}                 # dotted overrides applied to every arm's NCA run config
    arms:                             # either arms ...
      hybrid: {}                      #   (at most one arm may be empty: the base itself, the control)
      adamw: {optim.kind: adamw, optim.adamw.lr: 8.0e-4}
    factors:                          # ... or factors: the cross product of their levels
      optim.kind: [hybrid, adamw]     #   a dotted key and its values (arm label kind-hybrid, kind-adamw)
      routing:                        #   or a named factor whose levels are sets of overrides
        fresh: {model.attn_res: true}
        off: {model.attn_res: false}

Inside an arm (or a factor level), keys starting with `nca_run.` override that arm's NCA run config, and
every `model.*` override (of the arm or of `overrides`) except `model.vocab_size` applies to the NCA run
too, because nca_transfer needs the NCA model to have the language model's layout. An arm's NCA chain
(rule search, NCA data, NCA training) is therefore shared with every other arm whose NCA config is the
same: identical configs give identical digests, so the stage runs once and the other arms reuse it.

Per arm: the `arm` pipeline of stages/graph.py, data → [NCA chain with boundaries] → train → eval → export
→ report (one-run page); at the end one comparison report of all arms (the report stage with inputs named
by arm). No Prefect here: the plan, every digest and every config error are known before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from kotodama_core.config import (CONFIGS_ROOT, ConfigError, RunConfig, apply_overrides, load_tree,
                                   read_yaml_mapping, validate)
from kotodama_core.config_tree import flatten
from kotodama_core.schema import StrictModel
from stages.graph import Step, build, make_step
from stages.registry import STAGES

ABLATIONS_DIR = CONFIGS_ROOT / "ablations"
NCA_PREFIX = "nca_run."
# Input names the stages read as parts of one run (so they cannot label comparison columns).
RESERVED_ARM_NAMES = tuple(sorted({i.name for s in STAGES.values() for i in s.inputs}))
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_NOT_MIRRORED = ("model.vocab_size",)


class AblationSpec(StrictModel):
    name: str
    description: str = ""
    base: str
    nca: str | None = None
    token_budget: int | None = None
    overrides: dict[str, Any] = {}
    nca_overrides: dict[str, Any] = {}
    arms: dict[str, dict[str, Any]] | None = None
    factors: dict[str, list[Any] | dict[str, dict[str, Any]]] | None = None
    max_arms: int = 16


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict[str, Any]          # the arm's own dotted overrides (language run)
    nca_overrides: dict[str, Any]      # the arm's own `nca_run.` overrides, without the prefix
    cfg: RunConfig
    nca_cfg: RunConfig | None
    changed: tuple[str, ...]           # dotted keys whose resolved value differs from the base config


@dataclass
class AblationPlan:
    spec: AblationSpec
    base: RunConfig
    arms: list[Arm]
    steps: list[Step]                  # every distinct stage invocation in run order, the comparison last
    arm_steps: dict[str, dict[str, Step]] = field(default_factory=dict)  # arm -> stage key -> step

    @property
    def compare(self) -> Step:
        return self.steps[-1]

    def arms_of(self, step: Step) -> list[str]:
        return [a for a, steps in self.arm_steps.items() if any(s.digest == step.digest for s in steps.values())]


def spec_path(spec: str) -> Path:
    """`tiny`, `ablations/tiny`, `configs/ablations/tiny.yaml` or any path to a spec file."""
    candidates = [Path(spec), ABLATIONS_DIR / spec, CONFIGS_ROOT / spec]
    for c in list(candidates):
        candidates.append(c.with_name(c.name + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    have = sorted(p.stem for p in ABLATIONS_DIR.glob("*.yaml"))
    raise ConfigError(f"no ablation spec {spec!r} (configs/ablations has: {', '.join(have) or 'nothing'})")


def load_spec(spec: str | Path | Mapping[str, Any]) -> AblationSpec:
    if isinstance(spec, Mapping):
        raw, origin = dict(spec), "ablation spec"
    else:
        path = spec_path(str(spec))
        origin = str(path)
        raw = read_yaml_mapping(path)
    try:
        parsed = AblationSpec.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            problems.append(f"unknown ablation key {loc!r}" if err["type"] == "extra_forbidden"
                            else f"{loc}: {err['msg']}")
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None
    if (parsed.arms is None) == (parsed.factors is None):
        raise ConfigError(f"{origin}: give exactly one of `arms` or `factors`")
    if parsed.token_budget is not None and parsed.token_budget <= 0:
        raise ConfigError(f"{origin}: token_budget must be positive")
    return parsed


# -- arms --------------------------------------------------------------------------------------------

def _check_keys(where: str, overrides: Mapping[str, Any]) -> None:
    for key in overrides:
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"{where}: override key {key!r} must be dotted, like 'optim.kind'")


def _label(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "none"


def expand_arms(spec: AblationSpec) -> dict[str, dict[str, Any]]:
    """Arm name -> overrides: the `arms` as given, or the cross product of the `factors` levels."""
    if spec.arms is not None:
        arms = {name: dict(o) for name, o in spec.arms.items()}
    else:
        factor_levels: list[list[tuple[str, dict[str, Any]]]] = []
        for factor, levels in (spec.factors or {}).items():
            if isinstance(levels, list):
                if "." not in factor:
                    raise ConfigError(f"factor {factor!r}: a list of levels needs a dotted config key as the "
                                      f"factor name (or give named levels: {{level: {{dotted: value}}}})")
                short = factor.rsplit(".", 1)[-1]
                options = [(f"{short}-{_label(v)}", {factor: v}) for v in levels]
            else:
                options = [(level, dict(o)) for level, o in levels.items()]
            if len(options) < 2:
                raise ConfigError(f"factor {factor!r} needs at least two levels, got {len(options)}")
            factor_levels.append(options)
        arms = {}
        for combo in itertools.product(*factor_levels):
            name = "+".join(label for label, _ in combo)
            if name in arms:
                raise ConfigError(f"factor levels give two arms named {name!r}: name the levels "
                                  f"({{factor: {{level: {{dotted: value}}}}}})")
            merged: dict[str, Any] = {}
            for _, o in combo:
                clash = set(merged) & set(o)
                if clash:
                    raise ConfigError(f"factors set the same key(s) {sorted(clash)} (arm {name!r})")
                merged.update(o)
            arms[name] = merged
    if len(arms) < 2:
        raise ConfigError(f"an ablation needs at least two arms, got {len(arms)}")
    if len(arms) > spec.max_arms:
        raise ConfigError(f"{len(arms)} arms exceed max_arms={spec.max_arms} (raise it in the spec if meant)")
    for name in arms:
        if not _ARM_NAME.match(name) or name in RESERVED_ARM_NAMES:
            raise ConfigError(f"arm name {name!r}: use letters, digits, '_', '.', '+', '-' (not starting with "
                              f"one of those), and none of {', '.join(RESERVED_ARM_NAMES)}")
    return arms


def changed_keys(base: RunConfig, other: RunConfig,
                 ignore: tuple[str, ...] = ("name", "report.title")) -> tuple[str, ...]:
    """Dotted keys whose resolved values differ (the run name and report title aside)."""
    a, b = flatten(base.model_dump(mode="json")), flatten(other.model_dump(mode="json"))
    return tuple(sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k)))


def _resolve_path(name: str) -> Path:
    p = CONFIGS_ROOT / name
    for c in (p, p.with_name(p.name + ".yaml"), Path(name)):
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"run config {name!r} not found under {CONFIGS_ROOT}")


def _budget(spec: AblationSpec, where: str, tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Fix train.steps from the token budget; refuse overrides that would break the fixed budget."""
    if spec.token_budget is None:
        return tree
    if "train.steps" in overrides:
        raise ConfigError(f"{where}: train.steps is fixed by token_budget ({spec.token_budget:,} tokens)")
    gbt = int(tree.get("train", {}).get("global_batch_tokens", 0) or validate(tree, where).train.global_batch_tokens)
    steps = spec.token_budget // gbt
    if steps < 1:
        raise ConfigError(f"{where}: token_budget {spec.token_budget:,} is less than one step of {gbt:,} tokens")
    return apply_overrides(tree, {"train.steps": steps})


def resolve_arms(spec: AblationSpec, overrides: Mapping[str, Any] | None = None,
                 only: list[str] | None = None) -> tuple[RunConfig, list[Arm]]:
    """The base config (common overrides, budget applied) and every arm's resolved language/NCA configs."""
    common = {**spec.overrides, **dict(overrides or {})}
    _check_keys("overrides", common)
    _check_keys("nca_overrides", spec.nca_overrides)
    if any(k.startswith(NCA_PREFIX) for k in common):
        raise ConfigError(f"overrides: use nca_overrides instead of {NCA_PREFIX}… keys")
    base_tree = _budget(spec, "base", apply_overrides(load_tree(_resolve_path(spec.base)), common), common)
    base = validate(base_tree, origin=f"{spec.base} with the ablation's overrides")
    arms_overrides = expand_arms(spec)
    if only:
        unknown = sorted(set(only) - set(arms_overrides))
        if unknown:
            raise ConfigError(f"unknown arm(s) {unknown}; the spec has {list(arms_overrides)}")
        if len(only) < 2:
            raise ConfigError("run at least two arms (a comparison needs two)")
        arms_overrides = {k: v for k, v in arms_overrides.items() if k in only}
    nca_tree = None
    empty = [n for n, o in arms_overrides.items() if not o]
    if len(empty) > 1 and spec.arms is not None:
        raise ConfigError(f"arms {empty} are all empty: only one arm may be the base itself")
    arms: list[Arm] = []
    for name, arm_over in arms_overrides.items():
        where = f"arm {name!r}"
        _check_keys(where, arm_over)
        lang = {k: v for k, v in arm_over.items() if not k.startswith(NCA_PREFIX)}
        nca_own = {k[len(NCA_PREFIX):]: v for k, v in arm_over.items() if k.startswith(NCA_PREFIX)}
        _check_keys(where, nca_own)
        tree = apply_overrides(base_tree, lang)
        if spec.token_budget is None and ({"train.steps", "train.global_batch_tokens"} & set(lang)):
            raise ConfigError(f"{where}: arms train the same tokens; set token_budget to vary the batch")
        tree = _budget(spec, where, tree, lang)
        tree = apply_overrides(tree, {"name": f"{spec.name}.{name}",
                                      "report.title": f"{spec.name} ablation, arm {name}"})
        cfg = validate(tree, origin=f"{spec.base} + {where}")
        if spec.arms is not None:
            flat_base = flatten(base.model_dump(mode="json"))
            flat_arm = flatten(cfg.model_dump(mode="json"))
            same = sorted(k for k in lang if k in flat_base and flat_arm.get(k) == flat_base[k])
            if same:
                raise ConfigError(f"{where}: {same} already have these values in the base; an arm changes "
                                  f"its factor (leave the arm empty `{{}}` for the base itself)")
        nca_cfg = None
        if cfg.train.init.mode == "nca_transfer":
            if spec.nca is None:
                raise ConfigError(f"{where} initialises by nca_transfer: give the spec an `nca:` run config")
            if nca_tree is None:
                nca_tree = load_tree(_resolve_path(spec.nca))
            mirrored = {k: v for k, v in {**common, **lang}.items()
                        if k.startswith("model.") and k not in _NOT_MIRRORED}
            ntree = apply_overrides(nca_tree, {**spec.nca_overrides, **mirrored, **nca_own})
            nca_cfg = validate(ntree, origin=f"{spec.nca} for {where}")
        elif nca_own:
            raise ConfigError(f"{where}: {NCA_PREFIX}… keys need train.init.mode nca_transfer")
        elif cfg.train.init.mode != "scratch":
            raise ConfigError(f"{where}: arms start from scratch or by nca_transfer, not "
                              f"train.init.mode={cfg.train.init.mode!r}")
        arms.append(Arm(name, dict(lang), nca_own, cfg, nca_cfg, changed_keys(base, cfg)))
    return base, arms


# -- the plan ----------------------------------------------------------------------------------------

def arm_steps(arm: Arm) -> dict[str, Step]:
    """The `arm` pipeline (stages/graph.py) for this arm's configs, keyed by role."""
    return {s.key: s for s in build("arm", arm.cfg, arm.nca_cfg)}


def build_ablation_plan(spec: str | Path | Mapping[str, Any] | AblationSpec,
                        overrides: Mapping[str, Any] | None = None, only: list[str] | None = None) -> AblationPlan:
    """Every distinct stage of every arm with its digest (shared stages once), then the comparison."""
    spec = spec if isinstance(spec, AblationSpec) else load_spec(spec)
    base, arms = resolve_arms(spec, overrides, only)
    raw = {a.name: arm_steps(a) for a in arms}
    seen: dict[str, str] = {}
    for a in arms:
        train = raw[a.name]["train"].digest
        if train in seen:
            raise ConfigError(f"arms {seen[train]!r} and {a.name!r} train the same configuration")
        seen[train] = a.name

    users: dict[str, list[str]] = {}
    for a in arms:
        for s in raw[a.name].values():
            users.setdefault(s.digest, [])
            if a.name not in users[s.digest]:
                users[s.digest].append(a.name)

    def display_key(role: str, digest: str) -> str:
        who = users[digest]
        if len(who) == len(arms):
            return role
        if len(who) == 1:
            return f"{who[0]}.{role}"
        return f"{role}[{'+'.join(who)}]"

    canonical: dict[str, Step] = {}
    ordered: list[Step] = []
    per_arm: dict[str, dict[str, Step]] = {}
    for a in arms:
        per_arm[a.name] = {}
        for role, s in raw[a.name].items():
            if s.digest not in canonical:
                inputs = {k: canonical[v.digest] if isinstance(v, Step) else v for k, v in s.inputs.items()}
                canonical[s.digest] = dataclasses.replace(s, key=display_key(role, s.digest), inputs=inputs)
                ordered.append(canonical[s.digest])
            per_arm[a.name][role] = canonical[s.digest]
    compare_cfg = validate(apply_overrides(copy.deepcopy(base.model_dump(mode="json")),
                                           {"name": spec.name, "report.title": f"{spec.name} ablation"}),
                           origin="comparison")
    compare = make_step("compare", "report", compare_cfg, {a.name: per_arm[a.name]["report"] for a in arms})
    ordered.append(compare)
    return AblationPlan(spec=spec, base=base, arms=arms, steps=ordered, arm_steps=per_arm)


def describe(plan: AblationPlan) -> str:
    """A Markdown table: each arm, what it changes, its steps and which of them it shares."""
    spec = plan.spec
    budget = (f"{spec.token_budget:,} tokens" if spec.token_budget else "the base's train.steps") + \
        f" → {', '.join(sorted({str(a.cfg.train.steps) for a in plan.arms}))} steps per arm"
    lines = [f"# ablation {spec.name}", "", spec.description.strip(), "", f"base `{spec.base}`, budget {budget}", "",
             "| arm | changes | train digest | shared stages |", "|---|---|---|---|"]
    for a in plan.arms:
        steps = plan.arm_steps[a.name]
        shared = [r for r, s in steps.items() if len(plan.arms_of(s)) > 1]
        changes = ", ".join(f"`{k}={v}`" for k, v in {**a.overrides, **{NCA_PREFIX + k: v for k, v in
                                                                          a.nca_overrides.items()}}.items()) or "(base)"
        lines.append(f"| {a.name} | {changes} | `{steps['train'].digest[:12]}` | {', '.join(shared) or '-'} |")
    lines += ["", "| step | stage | digest | artifact |", "|---|---|---|---|"]
    lines += [f"| {s.key} | {s.stage} | `{s.digest[:16]}` | `{s.out}` |" for s in plan.steps]
    return "\n".join(lines) + "\n"
