"""Reading the documents of one source, in a fixed order, from local files or the Hugging Face hub.

Local files: `*.jsonl`, `*.jsonl.zst` (one JSON object per line, split on "\\n" only), `*.parquet`,
`*.txt` (the whole file is one document). Globs expand in sorted order. Hub sources stream through
`datasets.load_dataset(..., streaming=True)`.

Bad input yields an item with a reason (`malformed_json`, `invalid_utf8`, `missing_text`,
`empty_file`) when not strict, and raises `DataInputError` naming file and line when strict.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kotodama_core.data.config import DataConfig, SourceConfig
from kotodama_core.data.formatters import FormatError, format_record
from kotodama_core.errors import UserError

MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_TEXT = "missing_text"
EMPTY_FILE = "empty_file"


class DataInputError(UserError, ValueError):
    """A source's input is missing or bad; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    """One document slot: its text, or the reason it could not be read (text is then None)."""

    text: str | None
    reason: str | None = None
    chars: int = 0


def source_files(source: SourceConfig, cfg: DataConfig) -> list[Path]:
    """The files of a local source: globs expanded in sorted order; a pattern matching nothing is an error."""
    out: list[Path] = []
    for pattern in source.files:
        full = cfg.resolve_path(pattern)
        matches = sorted(Path(m) for m in glob.glob(str(full), recursive=True)) if glob.has_magic(str(full)) \
            else ([full] if full.is_file() else [])
        if not matches:
            raise DataInputError(f"source {source.name!r}: no file matches {pattern!r} (looked for {full})")
        out += matches
    return out


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in ((".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".parquet", "parquet"),
                         (".txt", "txt")):
        if name.endswith(suffix):
            return kind
    raise DataInputError(f"{path}: unsupported file type (jsonl, jsonl.zst, parquet, txt)")


def _bad(reason: str, where: str, detail: str, chars: int, strict: bool) -> Item:
    if strict:
        raise DataInputError(f"{where}: {reason.replace('_', ' ')}: {detail} "
                             f"(set data.strict=false to skip and count such input)")
    return Item(None, reason, chars)


def _from_record(record: Any, source: SourceConfig, where: str, chars: int, strict: bool) -> Item:
    try:
        text = format_record(record, source.formatter, source.field_names())
        return Item(text, None, len(text))
    except FormatError as exc:
        return _bad(MISSING_TEXT, where, str(exc), chars, strict)


def _read_bytes(path: Path, kind: str) -> bytes:
    if kind == "jsonl.zst":
        import zstandard

        with open(path, "rb") as fh:
            try:
                return zstandard.ZstdDecompressor().stream_reader(fh).read()
            except zstandard.ZstdError as exc:
                raise DataInputError(f"{path}: not a valid zstd stream ({exc})") from exc
    return path.read_bytes()


def _jsonl_items(path: Path, data: bytes, source: SourceConfig, strict: bool) -> Iterator[Item]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _bad(INVALID_UTF8, where, str(exc), len(raw.decode("utf-8", "replace")), strict)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _bad(MALFORMED_JSON, where, str(exc), len(line), strict)
            continue
        yield _from_record(record, source, where, len(line), strict)


def _parquet_items(path: Path, source: SourceConfig, strict: bool) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise DataInputError(f"{path}: not a readable parquet file ({exc})") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield _from_record(record, source, f"{path}:row {row}", len(json.dumps(record, default=str)), strict)


def _file_items(path: Path, source: SourceConfig, strict: bool) -> Iterator[Item]:
    kind = _file_kind(path)
    if kind == "parquet":
        items = _parquet_items(path, source, strict)
    else:
        data = _read_bytes(path, kind)
        if kind == "txt":
            try:
                items = iter([Item(text := data.decode("utf-8"), None, len(text))]) if data else iter(())
            except UnicodeDecodeError as exc:
                items = iter([_bad(INVALID_UTF8, str(path), str(exc), len(data.decode("utf-8", "replace")),
                                   strict)])
        else:
            items = _jsonl_items(path, data, source, strict)
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        yield _bad(EMPTY_FILE, str(path), "the file holds no document", 0, strict)


def _hub_items(source: SourceConfig, strict: bool) -> Iterator[Item]:
    import datasets

    stream = datasets.load_dataset(source.hf_id, source.hf_config, split=source.split, streaming=True)
    for row, record in enumerate(stream, start=1):
        where = f"{source.hf_id}[{source.hf_config or ''}:{source.split}] row {row}"
        yield _from_record(record, source, where, len(json.dumps(record, default=str)), strict)


def iter_items(source: SourceConfig, cfg: DataConfig) -> Iterator[Item]:
    """Every document slot of `source` in its fixed order."""
    if source.hf_id is not None:
        yield from _hub_items(source, cfg.strict)
        return
    for path in source_files(source, cfg):
        yield from _file_items(path, source, cfg.strict)
