"""Every stage, declared once: its module, its named inputs and their producers, its digest, its outputs.

The pipelines (stages/graph.py), the Prefect flows, the ablation flow, the stage command line and
`kotodama graph` all read these declarations; `stage_digest_for` is the one rule for a stage's digest,
used to predict it before a run and to write it into the manifest after:

    digest = sha256(stage name, the stage's config section, the digests of its inputs, code version
                    [, the content digests of its source files: the data stage])

An input is an upstream artifact folder (its manifest digest counts) or, for training's `init`, a
checkpoint file outside the pipeline (its sha256 counts).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping

from kotodama_core.artifacts import input_digest, stage_digest
from kotodama_core.config import RunConfig
from kotodama_core.schema import ConfigError

Section = Callable[[RunConfig], dict[str, Any]]


@dataclass(frozen=True)
class InputSpec:
    """A named input: which stages produce artifacts it accepts, and whether a stage run needs it."""

    name: str
    producers: tuple[str, ...]
    required: bool = True
    help: str = ""

    def describe(self) -> str:
        kinds = " or ".join(f"{p} artifact" if p != "file" else "checkpoint file" for p in self.producers)
        return f"{self.name}=<{kinds}>" + ("" if self.required else " (optional)")


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    summary: str
    section: Section
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[str, ...] = ()
    other_inputs: str = ""      # when set, inputs under any other name are accepted: what they must be
    content: Callable[[RunConfig], dict[str, str]] | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


def _sections(*names: str) -> Section:
    return lambda cfg: {name: cfg.section(name) for name in names}


def _data_section(cfg: RunConfig) -> dict[str, Any]:
    """The data section without the executor settings (`data.dask`), which never change the bytes written."""
    return cfg.data.digest_section()


def _data_content(cfg: RunConfig) -> dict[str, str]:
    from kotodama_core.data.provenance import source_content_digests

    return source_content_digests(cfg.data)


def _nca_search_section(cfg: RunConfig) -> dict[str, Any]:
    """The world, the rule space and the search; not packing (`steps`, `data`) or boundaries."""
    return {"nca": cfg.nca.model_dump(mode="json", exclude={"steps", "data", "boundaries"})}


def _nca_data_section(cfg: RunConfig) -> dict[str, Any]:
    """The world, trajectory length and packing; the rules come from the bank (the `rules` input)."""
    return {"nca": cfg.nca.model_dump(mode="json", exclude={"seed", "rule", "search", "boundaries"})}


def _boundaries_section(cfg: RunConfig) -> dict[str, Any]:
    return {"nca": {"boundaries": cfg.nca.boundaries.model_dump(mode="json")}}


_DATA_IN = InputSpec("data", ("data",), help="the tokenized evaluation mix (val_bpb)", required=False)

STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("data", "stages.data", "sources → cleaned, tokenized, shuffled Arrow shards",
              _data_section, outputs=("train/", "val/"), content=_data_content),
    StageSpec("nca_search", "stages.nca_search", "sample NCA rules, keep those whose gzip ratio passes",
              _nca_search_section, outputs=("rule_bank.pt", "rule_bank.json", "scores.npy")),
    StageSpec("nca_data", "stages.nca_data", "NCA trajectories of the rule bank → token shards",
              _nca_data_section, inputs=(InputSpec("rules", ("nca_search",)),), outputs=("train/", "val/")),
    StageSpec("train", "stages.train", "pre-train or continue training (torchrun DDP); checkpoints, metrics",
              _sections("model", "optim", "schedule", "train"),
              inputs=(InputSpec("data", ("data", "nca_data")),
                      InputSpec("init", ("train", "file"), required=False,
                                help="weights to start from (train.init.mode says how)")),
              outputs=("model.pt.zst", "metrics.jsonl", "config.yaml")),
    StageSpec("boundaries", "stages.boundaries", "AttnRes block boundaries from the NCA model's geometry",
              _boundaries_section,
              inputs=(InputSpec("checkpoint", ("train",)), InputSpec("data", ("nca_data",))),
              outputs=("boundaries.json", "profile.png")),
    StageSpec("eval", "stages.eval", "lm-eval tasks and val_bpb of a trained model",
              _sections("eval", "model"), inputs=(InputSpec("checkpoint", ("train",)), _DATA_IN),
              outputs=("results.json", "results.md")),
    StageSpec("export", "stages.export", "quantized 16 MB artifact and its dequantized eval gap",
              _sections("export", "model"), inputs=(InputSpec("checkpoint", ("train",)), _DATA_IN),
              outputs=("model.int.ptz", "code_files.json")),
    StageSpec("report", "stages.report", "one run's HTML report, or a comparison page of several runs",
              _sections("report"),
              inputs=(InputSpec("train", ("train",), required=False), InputSpec("eval", ("eval",), required=False),
                      InputSpec("export", ("export",), required=False),
                      InputSpec("nca_train", ("train",), required=False),
                      InputSpec("boundaries", ("boundaries",), required=False)),
              outputs=("summary.json",),
              other_inputs="report artifacts to compare, one per run, named by run (at least two)"),
)}


def spec(stage: str) -> StageSpec:
    try:
        return STAGES[stage]
    except KeyError:
        raise ConfigError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}") from None


def config_section(stage: str, cfg: RunConfig) -> dict[str, Any]:
    """The part of the run config that enters `stage`'s digest (and its manifest's `config`)."""
    return spec(stage).section(cfg)


def content_digests(stage: str, cfg: RunConfig) -> dict[str, str] | None:
    """Content digests of the files a stage reads outside the pipeline (the data stage's sources)."""
    fn = spec(stage).content
    return fn(cfg) if fn is not None else None


def stage_digest_for(stage: str, cfg: RunConfig, input_digests: Mapping[str, str],
                     content: Mapping[str, str] | None = None) -> str:
    """The digest of `stage` run with `cfg` on inputs with these digests (content: `content_digests`)."""
    return stage_digest(stage, config_section(stage, cfg), input_digests, content=content)


def check_inputs(stage: str, inputs: Mapping[str, Any]) -> None:
    """Refuse an input name the stage does not take, and a missing required input, in one line each."""
    s = spec(stage)
    takes = ", ".join(i.describe() for i in s.inputs) or "no inputs"
    unknown = sorted(set(inputs) - set(s.input_names))
    if unknown and not s.other_inputs:
        raise ConfigError(f"stages.{stage} takes no input named {', '.join(map(repr, unknown))}; "
                          f"it takes: {takes}")
    if s.other_inputs and unknown and set(inputs) & set(s.input_names):
        raise ConfigError(f"stages.{stage}: inputs {unknown} cannot be mixed with "
                          f"{sorted(set(inputs) & set(s.input_names))}; give either {takes}, or only "
                          f"{s.other_inputs}")
    if s.other_inputs and unknown:
        return
    missing = [i.describe() for i in s.inputs if i.required and i.name not in inputs]
    if missing:
        raise ConfigError(f"stages.{stage} needs --input {' --input '.join(missing)}")


def identity(stage: str, cfg: RunConfig) -> dict[str, Any]:
    """What a stage passes to `write_manifest` so the manifest's digest is the one predicted here."""
    return {"config": config_section(stage, cfg), "content": content_digests(stage, cfg)}


__all__ = ["InputSpec", "STAGES", "StageSpec", "check_inputs", "config_section", "content_digests", "identity",
           "input_digest", "spec", "stage_digest_for"]
