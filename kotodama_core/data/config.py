"""Data-stage config section `data`: the source table, cleaning, tokenization, packing and executor.

Relative file paths (source `files`, a local `tokenizer`) resolve against `data.files_root` when set,
else against the repository root (the folder holding `configs/`), so `../shared/data/...` in a source
table means "beside the repository", wherever the command runs from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kotodama_core.schema import StrictModel

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARE_TOLERANCE = 1e-4

# The record fields each formatter reads, with their default names; `SourceConfig.fields` renames them.
FORMATTER_FIELDS: dict[str, dict[str, str]] = {
    "plain": {"text": "text"},
    "chat": {"messages": "messages", "role": "role", "content": "content", "speakers": ""},
    "qa": {"question": "question", "answer": "answer"},
    "code_reasoning": {"problem": "input", "reasoning": "output"},
}
Formatter = Literal["plain", "chat", "qa", "code_reasoning"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceConfig(StrictModel):
    """One row of a source table: where documents come from, how a record becomes text, its share."""

    name: str
    share: float
    # Hub source (streamed through `datasets`) ...
    hf_id: str | None = None
    hf_config: str | None = None
    split: str = "train"
    # ... or local files: jsonl, jsonl.zst, parquet, txt; globs allowed.
    files: list[str] = []
    formatter: Formatter = "plain"
    fields: dict[str, str] = {}
    # Token count of the published mix, in billions; documentation only, shares drive the mix.
    card_tokens_b: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "SourceConfig":
        if not _NAME.match(self.name):
            raise ValueError(f"source name {self.name!r} must be letters, digits, '_', '.', '-'")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"source {self.name!r}: share must be in (0, 1], got {self.share}")
        if (self.hf_id is None) == (not self.files):
            raise ValueError(f"source {self.name!r}: give exactly one of hf_id or files")
        unknown = set(self.fields) - set(FORMATTER_FIELDS[self.formatter])
        if unknown:
            raise ValueError(f"source {self.name!r}: formatter {self.formatter!r} has no field(s) "
                             f"{sorted(unknown)}; known: {sorted(FORMATTER_FIELDS[self.formatter])}")
        return self

    def field_names(self) -> dict[str, str]:
        """The formatter's record keys after this source's renames."""
        return {**FORMATTER_FIELDS[self.formatter], **self.fields}


class DaskConfig(StrictModel):
    """Where the work runs. It never changes the output, so it is left out of the stage digest."""

    workers: int = 2            # LocalCluster process workers, one thread each; 0 = in this process
    scheduler: str | None = None  # address of a running Dask scheduler instead of a LocalCluster
    chunk_chars: int = 1_000_000  # characters of raw text per task
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> "DaskConfig":
        if self.workers < 0:
            raise ValueError(f"data.dask.workers must be >= 0, got {self.workers}")
        if self.chunk_chars < 1:
            raise ValueError(f"data.dask.chunk_chars must be positive, got {self.chunk_chars}")
        return self


class DataConfig(StrictModel):
    sources: list[SourceConfig] = []
    tokenizer: str = "HuggingFaceTB/SmolLM2-135M"
    seq_len: int = 4096
    # Tokens in the mix (train + val); null = the largest mix every source fills without repeating.
    total_tokens: int | None = None
    seed: int = 42
    eos_id: int = 0
    val_fraction: float = 0.005
    ocr_garbage_threshold: float = 0.05
    drop_duplicates: bool = False
    # strict: bad input (malformed JSON, invalid UTF-8, missing field, empty file) is an error;
    # otherwise it is skipped and counted under its reason in the manifest.
    strict: bool = True
    # A document (a jsonl line or a txt file) longer than this is skipped and counted as `oversized`,
    # so that one huge record cannot exhaust memory (tokenizing 50 MB of text peaked near 5 GB).
    max_document_bytes: int = 16 << 20
    shard_tokens: int = Field(default=1 << 27, description="tokens per output shard (rounded to windows)")
    files_root: str | None = None
    dask: DaskConfig = DaskConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be positive, got {self.seq_len}")
        if self.total_tokens is not None and self.total_tokens < 1:
            raise ValueError(f"data.total_tokens must be positive or null, got {self.total_tokens}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.ocr_garbage_threshold <= 1.0:
            raise ValueError(f"data.ocr_garbage_threshold must be in [0, 1], got {self.ocr_garbage_threshold}")
        if self.max_document_bytes < 1:
            raise ValueError(f"data.max_document_bytes must be positive, got {self.max_document_bytes}")
        if self.shard_tokens < 1 or self.eos_id < 0:
            raise ValueError("data.shard_tokens must be positive and data.eos_id non-negative")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"data.sources: duplicate source names {duplicates}")
        if self.sources:
            total = sum(s.share for s in self.sources)
            if abs(total - 1.0) > SHARE_TOLERANCE:
                raise ValueError(f"data.sources: shares sum to {total:.6f}, must sum to 1 "
                                 f"(within {SHARE_TOLERANCE})")
        return self

    @property
    def window(self) -> int:
        return self.seq_len + 1

    def root(self) -> Path:
        return Path(self.files_root).expanduser().resolve() if self.files_root else REPO_ROOT

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root() / p

    def digest_section(self) -> dict:
        """The fields that decide the output (everything but the executor), as JSON-able data."""
        return self.model_dump(mode="json", exclude={"dask"})
