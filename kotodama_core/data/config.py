"""Data-stage config section (the data helper owns and extends this)."""

from __future__ import annotations

from kotodama_core.schema import StrictModel


class SourceConfig(StrictModel):
    name: str
    share: float
    # Hub source: dataset id / config / split; local source: files (globs allowed).
    hf_id: str | None = None
    hf_config: str | None = None
    split: str = "train"
    files: list[str] = []
    text_field: str = "text"
    formatter: str = "plain"


class DataConfig(StrictModel):
    sources: list[SourceConfig] = []
    tokenizer: str = "HuggingFaceTB/SmolLM2-135M"
    seq_len: int = 4096
    seed: int = 42
    eos_id: int = 0
