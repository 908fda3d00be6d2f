"""Shared command line for stages: `python -m stages.<name> --config C --out DIR [--input k=PATH] [--set k=v]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from kotodama_core.artifacts import Manifest, read_manifest
from kotodama_core.config import ConfigError, RunConfig, load_config
from kotodama_core.errors import UserError

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
    from stages.registry import check_inputs, spec

    stage = spec(stage_name)
    takes = ", ".join(i.describe() for i in stage.inputs) or "none"
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage_name}",
                                     description=f"{stage.summary}. Inputs: {takes}"
                                                 + (f"; or {stage.other_inputs}" if stage.other_inputs else ""))
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                        help="an upstream artifact (folder or manifest.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.steps=100")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        inputs = parse_inputs(args.input)
        check_inputs(stage_name, inputs)
        cfg = load_config(args.config, args.set)
        manifest = run(cfg, inputs, Path(args.out))
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(manifest)
    return 0
