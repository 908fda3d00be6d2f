"""Reading the documents of one source, in a fixed order, from local files or the Hugging Face hub.

Local files: `*.jsonl`, `*.jsonl.zst` (one JSON object per line, split on "\\n" only), `*.parquet`,
`*.txt` (the whole file is one document). Globs expand in sorted order. Hub sources stream through
`datasets.load_dataset(..., streaming=True)`.

Bad input yields an item with a reason (`malformed_json`, `invalid_utf8`, `missing_text`, `empty_file`,
`truncated_tail` for a truncated or corrupt compressed file, `oversized` for a line over
`data.max_document_bytes`) when not strict, and raises `DataInputError` naming file and line (or byte offset)
when strict. Files are read in blocks, so memory never holds more than one capped line.
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
TRUNCATED_TAIL = "truncated_tail"
OVERSIZED = "oversized"


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


def _compressed_blocks(path: Path, strict: bool, block: int = 1 << 20) -> Iterator[bytes | Item]:
    """The decompressed bytes of a `.jsonl.zst` file, block by block (several frames allowed).

    A stream that ends inside a frame is truncated; a bad frame or checksum is corrupt. Strict mode stops
    there naming the file and the compressed byte offset; otherwise a `truncated_tail` item records how
    many compressed bytes were skipped, and the lines decoded before it are kept.
    """
    import zstandard

    size = path.stat().st_size
    offset = 0
    with open(path, "rb") as fh:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        in_frame = False
        while True:
            chunk = fh.read(block)
            if not chunk:
                break
            while chunk:
                try:
                    out = dobj.decompress(chunk)
                except zstandard.ZstdError as exc:
                    yield _bad(TRUNCATED_TAIL, f"{path} at compressed byte {offset}",
                               f"corrupt zstd data ({exc}); {size - offset:,} bytes skipped", size - offset, strict)
                    return
                in_frame = True
                if out:
                    yield out
                if dobj.eof:  # a frame ended: what follows is the next frame
                    in_frame = False
                    chunk = dobj.unused_data
                    dobj = zstandard.ZstdDecompressor().decompressobj()
                else:
                    chunk = b""
            offset = fh.tell()
        if in_frame:
            yield _bad(TRUNCATED_TAIL, f"{path} at compressed byte {size}",
                       "the zstd stream ends inside a frame (the file is truncated); the last, incomplete "
                       "line is skipped", 0, strict)


def _byte_blocks(path: Path, kind: str, strict: bool) -> Iterator[bytes | Item]:
    if kind == "jsonl.zst":
        yield from _compressed_blocks(path, strict)
        return
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            yield block


def _lines(blocks: Iterator[bytes | Item], where: str, max_bytes: int, strict: bool) -> Iterator[bytes | Item]:
    """Split byte blocks on newlines without ever holding more than `max_bytes` of one line: a longer line is
    skipped as `oversized` (its bytes counted) so one huge record cannot exhaust memory."""
    pending: list[bytes] = []
    held = 0
    skipping = 0
    for block in blocks:
        if isinstance(block, Item):  # a truncated or corrupt tail: the partial last line goes with it
            yield block
            return
        parts = block.split(b"\n")
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            if skipping:
                skipping += len(part)
            else:
                pending.append(part)
                held += len(part)
                if held > max_bytes:
                    skipping, pending, held = held, [], 0
            if last:
                break
            if skipping:
                yield _bad(OVERSIZED, where, f"a line of {skipping:,} bytes exceeds data.max_document_bytes "
                                             f"({max_bytes:,})", skipping, strict)
                skipping = 0
            else:
                yield b"".join(pending)
            pending, held = [], 0
    if skipping:
        yield _bad(OVERSIZED, where, f"a line of {skipping:,} bytes exceeds data.max_document_bytes ({max_bytes:,})",
                   skipping, strict)
    elif pending and held:
        yield b"".join(pending)


def _jsonl_items(path: Path, lines: Iterator[bytes | Item], source: SourceConfig, strict: bool) -> Iterator[Item]:
    for lineno, raw in enumerate(lines, start=1):
        if isinstance(raw, Item):
            yield raw
            continue
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


def _file_items(path: Path, source: SourceConfig, cfg: DataConfig) -> Iterator[Item]:
    kind = _file_kind(path)
    strict = cfg.strict
    if kind == "parquet":
        items = _parquet_items(path, source, strict)
    elif kind == "txt":
        if path.stat().st_size > cfg.max_document_bytes:
            items = iter([_bad(OVERSIZED, str(path), f"{path.stat().st_size:,} bytes exceed "
                                                     f"data.max_document_bytes ({cfg.max_document_bytes:,})",
                               path.stat().st_size, strict)])
        else:
            data = path.read_bytes()
            try:
                items = iter([Item(text := data.decode("utf-8"), None, len(text))]) if data else iter(())
            except UnicodeDecodeError as exc:
                items = iter([_bad(INVALID_UTF8, str(path), str(exc), len(data.decode("utf-8", "replace")),
                                   strict)])
    else:
        lines = _lines(_byte_blocks(path, kind, strict), str(path), cfg.max_document_bytes, strict)
        items = _jsonl_items(path, lines, source, strict)
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
        yield from _file_items(path, source, cfg)
