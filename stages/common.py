"""Shared command line for stages: `python -m stages.<name> --config C --out DIR [--input k=PATH] [--set k=v]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from kotodama_core.artifacts import ArtifactError, Manifest, read_manifest
from kotodama_core.config import ConfigError, RunConfig, load_config

StageFn = Callable[[RunConfig, dict[str, Path], Path], Path]


def parse_inputs(items: list[str]) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--input {item!r} must look like name=PATH")
        name, path = item.split("=", 1)
        inputs[name.strip()] = Path(path).expanduser()
    return inputs


def input_manifests(inputs: dict[str, Path], names: tuple[str, ...] = ()) -> dict[str, Manifest]:
    """Read the manifests of the named inputs (all when names is empty)."""
    return {k: read_manifest(p) for k, p in inputs.items() if not names or k in names}


def main(stage_name: str, run: StageFn, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage_name}")
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                        help="an upstream artifact (folder or manifest.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        manifest = run(cfg, parse_inputs(args.input), Path(args.out))
    except (ConfigError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0
