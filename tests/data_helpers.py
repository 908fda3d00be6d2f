"""Shared fixtures for the data tests: where the shared corpus is, and small configs over it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = SHARED_DATA / "corpus-mix"
TOKENIZER = SHARED_DATA / "smollm2-tokenizer"

needs_corpus = pytest.mark.skipif(not (CORPUS / "books.jsonl.zst").is_file() or
                                  not (TOKENIZER / "tokenizer.json").is_file(),
                                  reason="../shared/data (corpus-mix, smollm2-tokenizer) not present")


def write_run_config(path: Path, body: str) -> Path:
    """A run config extending the corpus-mix table (paths in it resolve against the repo root)."""
    path.write_text("extends: [sources/corpus-mix]\n" + body)
    return path
