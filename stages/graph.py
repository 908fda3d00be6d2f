"""Pipelines as stage graphs, declared once and built with every digest before anything runs.

A pipeline is an ordered tuple of `Node`s: a key, the stage (stages/registry.py), which config it runs
with (`run`, the pipeline's run config, or `nca`, the NCA run config of a chain that starts from NCA
pre-pretraining) and where each input comes from (another node's key, or `@init`: a checkpoint given
from outside). `build` turns a declaration and its configs into `Step`s whose digests are the ones the
stages will write (one rule: `stages.registry.stage_digest_for`), so the artifact folder, the Prefect
cache key and "what must rerun" are all known up front.

Run configs live in configs/runs: `<pipeline>.yaml` is the published recipe (preset `proxy-108m`),
`<pipeline>-<preset>.yaml` a scaled variant (e.g. `fullcorpus-tiny.yaml`). Chains that contain NCA
pre-pretraining read the NCA part from `nca[-<preset>].yaml`.

Decisions: fullcorpus and bcpt do not run `export` (their product is the checkpoint the card publishes;
a 108M model cannot fit the 16 MB artifact the export stage measures); ablation arms do, since golf
comparisons line up quantized bytes. Every chain that pre-pretrains on NCA computes `boundaries`, so an
arm's report shows the same NCA summary as a fullcorpus report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from kotodama_core.artifacts import MANIFEST, artifact_dir, input_digest
from kotodama_core.config import CONFIGS_ROOT, RunConfig, apply_overrides, load_tree, validate
from kotodama_core.schema import ConfigError
from stages.registry import check_inputs, config_section, content_digests, spec, stage_digest_for

DEFAULT_PRESET = "proxy-108m"
RUNS_DIR = CONFIGS_ROOT / "runs"
EXTERNAL_INIT = "@init"


@dataclass(frozen=True)
class Node:
    """One stage of a pipeline declaration; `inputs` maps input name -> node key (or `@init`)."""

    key: str
    stage: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    config: str = "run"


@dataclass(frozen=True)
class Pipeline:
    name: str
    description: str
    nodes: tuple[Node, ...]
    init_modes: tuple[str, ...]          # the run config's train.init.mode must be one of these
    nca_chain: str = "never"             # "never", "always" or "when_nca_transfer": nodes with config "nca"

    def node(self, key: str) -> Node:
        return next(n for n in self.nodes if n.key == key)


def _nca_chain(config: str) -> tuple[Node, ...]:
    return (Node("nca_search", "nca_search", config=config),
            Node("nca_data", "nca_data", {"rules": "nca_search"}, config=config),
            Node("nca_train", "train", {"data": "nca_data"}, config=config),
            Node("boundaries", "boundaries", {"checkpoint": "nca_train", "data": "nca_data"}, config=config))


_EVAL = Node("eval", "eval", {"checkpoint": "train", "data": "data"})
_NCA_REPORT_INPUTS = {"nca_train": "nca_train", "boundaries": "boundaries"}

PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    Pipeline("nca", "NCA rule search → trajectories → NCA pre-pretraining → AttnRes boundaries",
             _nca_chain("run"), init_modes=("scratch",), nca_chain="never"),
    Pipeline("fullcorpus", "text data + NCA chain → fullcorpus training (nca_transfer) → eval → report",
             (Node("data", "data"), *_nca_chain("nca"),
              Node("train", "train", {"data": "data", "init": "nca_train"}), _EVAL,
              Node("report", "report", {"train": "train", "eval": "eval", **_NCA_REPORT_INPUTS})),
             init_modes=("nca_transfer",), nca_chain="always"),
    Pipeline("bcpt", "books data → continued pretraining from fullcorpus weights (train.init.step) → eval → report",
             (Node("data", "data"), Node("train", "train", {"data": "data", "init": EXTERNAL_INIT}), _EVAL,
              Node("report", "report", {"train": "train", "eval": "eval"})),
             init_modes=("weights",)),
    Pipeline("arm", "one ablation arm: data [+ NCA chain] → train → eval → export → report",
             (Node("data", "data"), *_nca_chain("nca"),
              Node("train", "train", {"data": "data", "init": "nca_train"}), _EVAL,
              Node("export", "export", {"checkpoint": "train", "data": "data"}),
              Node("report", "report", {"train": "train", "eval": "eval", "export": "export",
                                        **_NCA_REPORT_INPUTS})),
             init_modes=("scratch", "nca_transfer"), nca_chain="when_nca_transfer"),
)}
DEPLOYED = ("fullcorpus", "bcpt", "nca")


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


def make_step(key: str, stage: str, cfg: RunConfig, inputs: Mapping[str, "Step | Path"]) -> Step:
    """A step with its predicted digest: upstream steps count by their digests, outside paths by theirs."""
    check_inputs(stage, inputs)
    digests = {k: v.digest if isinstance(v, Step) else input_digest(v) for k, v in inputs.items()}
    digest = stage_digest_for(stage, cfg, digests, content=content_digests(stage, cfg))
    return Step(key=key, stage=stage, cfg=cfg, inputs=dict(inputs), digest=digest,
                config_section=config_section(stage, cfg))


def pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ConfigError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}") from None


def build(name: str, cfg: RunConfig, nca_cfg: RunConfig | None = None,
          init: "Step | Path | None" = None) -> list[Step]:
    """The ordered steps of pipeline `name` for these configs (and an outside `init` checkpoint)."""
    p = pipeline(name)
    if cfg.train.init.mode not in p.init_modes:
        raise ConfigError(f"{name}: train.init.mode must be {' or '.join(map(repr, p.init_modes))} here, "
                          f"got {cfg.train.init.mode!r}")
    with_nca = p.nca_chain == "always" or (p.nca_chain == "when_nca_transfer"
                                           and cfg.train.init.mode == "nca_transfer")
    if with_nca and nca_cfg is None:
        raise ConfigError(f"{name}: train.init.mode {cfg.train.init.mode!r} needs the NCA run config")
    configs = {"run": cfg, "nca": nca_cfg if with_nca else None}
    built: dict[str, Step] = {}
    for node in p.nodes:
        node_cfg = configs[node.config]
        if node_cfg is None:
            continue
        inputs: dict[str, Step | Path] = {}
        for input_name, source in node.inputs.items():
            if source == EXTERNAL_INIT:
                if init is None:
                    raise ConfigError(f"{name}: the {node.key} step needs an init checkpoint")
                inputs[input_name] = init
            elif source in built:
                inputs[input_name] = built[source]
        built[node.key] = make_step(node.key, node.stage, node_cfg, inputs)
    return list(built.values())


def downstream_of(steps: list[Step], key: str) -> set[str]:
    """Keys of the steps that (transitively) read the output of step `key`, itself included."""
    found = {key}
    for s in steps:
        if any(isinstance(v, Step) and v.key in found for v in s.inputs.values()):
            found.add(s.key)
    return found


# -- run configs of the deployed pipelines ---------------------------------------------------------------

def run_config_path(name: str, preset: str) -> Path:
    if name not in DEPLOYED:
        raise ConfigError(f"unknown pipeline {name!r}; choose one of {', '.join(DEPLOYED)}")
    stem = name if preset == DEFAULT_PRESET else f"{name}-{preset}"
    path = RUNS_DIR / f"{stem}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in RUNS_DIR.glob(f"{name}*.yaml"))
        raise ConfigError(f"no run config {path} for pipeline {name!r} with preset {preset!r} "
                          f"(configs/runs has: {', '.join(have) or 'nothing'})")
    return path


def resolve(name: str, preset: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a run config, apply dotted overrides ({"eval.limit": 8}) and validate strictly."""
    path = run_config_path(name, preset)
    overrides = dict(overrides or {})
    for key in overrides:
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"override key {key!r} must be dotted, like 'train.steps'")
    tree = apply_overrides(load_tree(path), overrides)
    origin = f"{path.name}" + (f" with overrides {sorted(overrides)}" if overrides else "")
    return validate(tree, origin=origin)


def plan(name: str, preset: str, overrides: Mapping[str, Any] | None = None,
         nca_overrides: Mapping[str, Any] | None = None, init: "Step | Path | None" = None) -> list[Step]:
    """A deployed pipeline's steps from its preset's run configs. bcpt without `init` starts from the same
    preset's fullcorpus training step (predicted: it need not have run yet)."""
    if nca_overrides and name != "fullcorpus":
        raise ConfigError(f"nca_overrides applies to the fullcorpus pipeline; for {name!r} use overrides")
    if name == "nca":
        return build("nca", resolve("nca", preset, overrides))
    if name == "fullcorpus":
        return build("fullcorpus", resolve("fullcorpus", preset, overrides), resolve("nca", preset, nca_overrides))
    if name == "bcpt":
        cfg = resolve("bcpt", preset, overrides)
        if init is None:
            fc_train = next(s for s in plan("fullcorpus", preset) if s.key == "train")
            init = replace(fc_train, key="fullcorpus.train")
        return build("bcpt", cfg, init=init)
    raise ConfigError(f"unknown pipeline {name!r}; choose one of {', '.join(DEPLOYED)}")


def describe(name: str, steps: list[Step]) -> str:
    """The graph as text: each step, its stage and digest, and where each of its inputs comes from."""
    lines = [f"{name}: {pipeline(name).description}" if name in PIPELINES else name]
    width = max(len(s.key) for s in steps)
    for s in steps:
        lines.append(f"  {s.key:<{width}}  stages.{s.stage:<10}  {s.digest[:16]}  "
                     f"{'done' if s.manifest.is_file() else 'to run'}")
        for input_name, v in s.inputs.items():
            where = f"{v.key} ({v.digest[:16]})" if isinstance(v, Step) else f"{v} ({input_digest(v)[:16]})"
            lines.append(f"  {'':<{width}}    {input_name} ← {where}")
        if spec(s.stage).outputs:
            lines.append(f"  {'':<{width}}    writes {', '.join(spec(s.stage).outputs)} → {s.out}")
    return "\n".join(lines)
