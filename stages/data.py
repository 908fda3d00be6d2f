"""Data stage: the source table of `data` → cleaned, tokenized, mixed and shuffled Arrow shards.

Output folder: manifest.json, train/shard_*.arrow, val/shard_*.arrow (see kotodama_core.data.build for
the mixing rule and docs/data.md for cleaning). The stage digest covers the `data` section without its
`dask` executor settings, which never change the output.
"""

from __future__ import annotations

from pathlib import Path

from kotodama_core import artifacts
from kotodama_core.config import ConfigError, RunConfig
from kotodama_core.data.build import build_dataset
from kotodama_core.data.readers import DataInputError
from kotodama_core.data.tokenizer import TokenizerError
from stages.common import main
from stages.registry import identity


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    if inputs:
        raise ConfigError(f"the data stage takes no --input, got {sorted(inputs)}")
    out = Path(out)
    work = artifacts.begin(out)
    try:
        extra, metrics = build_dataset(cfg.data, work)
    except (DataInputError, TokenizerError) as exc:
        raise ConfigError(str(exc)) from exc
    artifacts.write_manifest(work, stage="data", **identity("data", cfg), inputs={},
                             metrics=metrics, extra=extra)
    return artifacts.commit(out)


if __name__ == "__main__":
    raise SystemExit(main("data", run))
