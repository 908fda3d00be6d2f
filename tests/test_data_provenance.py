"""Data provenance: truncated sources, source content in the digest, verified shards, capped lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import zstandard

from kotodama_core.artifacts import ArtifactError
from kotodama_core.data.config import DataConfig, SourceConfig
from kotodama_core.data.readers import DataInputError, iter_items
from tests.conftest import write_markov_artifact
from tests.data_helpers import CORPUS, needs_corpus


def _source_cfg(path, strict=True, **extra) -> tuple[SourceConfig, DataConfig]:
    source = SourceConfig(name="s", share=1.0, files=[str(path)])
    return source, DataConfig(sources=[source], strict=strict, **extra)


def _write_zst(path, lines: list[bytes]) -> bytes:
    blob = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(b"\n".join(lines) + b"\n")
    path.write_bytes(blob)
    return blob


def _records(n: int) -> list[bytes]:
    return [json.dumps({"text": f"document number {i} " + "word " * 400}).encode() for i in range(n)]


def test_truncated_zstd_source_is_refused_in_strict_mode_naming_the_file(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    blob = _write_zst(path, _records(200))
    path.write_bytes(blob[: len(blob) // 2])
    source, cfg = _source_cfg(path)
    with pytest.raises(DataInputError, match=r"s\.jsonl\.zst at compressed byte \d+.*truncated"):
        list(iter_items(source, cfg))


def test_truncated_zstd_source_keeps_its_complete_lines_when_lenient(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    blob = _write_zst(path, _records(200))
    path.write_bytes(blob[: len(blob) // 2])
    source, cfg = _source_cfg(path, strict=False)
    items = list(iter_items(source, cfg))
    texts = [i for i in items if i.text is not None]
    assert 0 < len(texts) < 200 and items[-1].reason == "truncated_tail"
    assert all(i.reason in (None, "truncated_tail") for i in items)


def test_corrupt_zstd_bytes_are_refused(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    blob = bytearray(_write_zst(path, _records(50)))
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    source, cfg = _source_cfg(path)
    with pytest.raises(DataInputError, match="s.jsonl.zst"):
        list(iter_items(source, cfg))


def test_a_whole_multi_frame_file_reads_every_line(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    c = zstandard.ZstdCompressor(level=3, write_checksum=True)
    path.write_bytes(c.compress(b"\n".join(_records(3)) + b"\n") + c.compress(b"\n".join(_records(2)) + b"\n"))
    source, cfg = _source_cfg(path)
    assert sum(i.text is not None for i in iter_items(source, cfg)) == 5


def test_an_oversized_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "s.jsonl"
    big = json.dumps({"text": "x" * 5000}).encode()
    path.write_bytes(b"\n".join([_records(1)[0], big, _records(1)[0]]) + b"\n")
    source, cfg = _source_cfg(path, strict=False, max_document_bytes=4096)
    items = list(iter_items(source, cfg))
    assert [i.reason for i in items] == [None, "oversized", None]
    assert items[1].chars >= 5000


def test_a_50_mb_line_does_not_blow_up_memory(tmp_path):
    """Peak RSS while reading a 50 MB line with the default cap stays far below the line's size × 10."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "' + b"a" * (50 << 20) + b'"}\n' + _records(1)[0] + b"\n")
    code = (
        "import resource, sys\n"
        "from kotodama_core.data.config import DataConfig, SourceConfig\n"
        "from kotodama_core.data.readers import iter_items\n"
        f"s = SourceConfig(name='s', share=1.0, files=[{str(path)!r}])\n"
        "cfg = DataConfig(sources=[s], strict=False)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "reasons = [i.reason for i in iter_items(s, cfg)]\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(reasons, (peak - base) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    reasons, grown_mb = out.stdout.rsplit(" ", 1)
    assert reasons == "['oversized', None]"
    assert int(grown_mb) < 100, f"reading grew RSS by {grown_mb} MB"


def test_source_content_digest_follows_the_bytes_and_is_cached(tmp_path, monkeypatch):
    from kotodama_core.data import provenance

    monkeypatch.setenv("KOTODAMA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"text": "one"}\n')
    _, cfg = _source_cfg(path)
    first = provenance.source_content_digests(cfg)
    assert list(first) == ["s:s.jsonl"]
    reads = []
    monkeypatch.setattr(provenance, "sha256_file", lambda p: reads.append(p) or "x")
    assert provenance.source_content_digests(cfg) == first and reads == []  # a cache hit reads nothing
    monkeypatch.undo()
    monkeypatch.setenv("KOTODAMA_CACHE_DIR", str(tmp_path / "cache"))
    path.write_bytes(b'{"text": "two"}\n')
    assert provenance.source_content_digests(cfg) != first


@needs_corpus
def test_a_changed_source_changes_the_data_stage_digest(tmp_path, monkeypatch):
    from kotodama_core.config import load_config
    from stages.registry import stage_digest_for, content_digests

    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    books = tmp_path / "books.jsonl.zst"
    books.write_bytes((CORPUS / "books.jsonl.zst").read_bytes())
    cfg = load_config("configs/runs/fullcorpus-tiny.yaml",
                      {"data.sources": [{"name": "books", "share": 1.0, "files": [str(books)]}]})
    before = stage_digest_for("data", cfg, {}, content=content_digests("data", cfg))
    books.write_bytes(books.read_bytes()[:-10])
    assert stage_digest_for("data", cfg, {}, content=content_digests("data", cfg)) != before


def test_the_loader_refuses_a_tampered_shard_naming_it(tmp_path):
    from kotodama_core.data.loader import TokenLoader

    data = write_markov_artifact(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"][0]["path"]
    TokenLoader(data, batch_size=2).next_batch()  # clean: loads
    raw = bytearray(shard.read_bytes())
    raw[-200] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=f"shard {shard}.*does not match its manifest"):
        TokenLoader(data, batch_size=2)


def test_the_loader_refuses_token_ids_outside_the_vocabulary(tmp_path):
    from kotodama_core.data.loader import TokenLoader

    data = write_markov_artifact(tmp_path / "data", vocab=256)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vocab_size"] = 100  # the shards hold ids up to 255
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"token id \d+ at position \d+ .*outside the vocabulary of 100"):
        TokenLoader(data, batch_size=2)


@needs_corpus
def test_unset_total_tokens_says_the_mix_size_and_lenient_skips_warn(tmp_path, capsys):
    """A build with data.total_tokens unset prints the size it produced; a truncated source read leniently
    warns and the manifest counts the skipped tail."""
    from kotodama_core.data.build import build_dataset
    from tests.data_helpers import TOKENIZER

    import random

    rng = random.Random(0)
    words = ["river", "stone", "lantern", "quiet", "harbour", "meadow", "copper", "winter", "orchard", "signal"]
    docs = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(300)) + "."}).encode()
            for _ in range(400)]  # > one 128 KB zstd block, so the first half decodes
    path = tmp_path / "s.jsonl.zst"
    blob = _write_zst(path, docs)
    path.write_bytes(blob[: len(blob) // 2])
    source = SourceConfig(name="s", share=1.0, files=[str(path)])
    cfg = DataConfig(sources=[source], strict=False, seq_len=64, tokenizer=str(TOKENIZER / "tokenizer.json"),
                     dask={"workers": 0, "progress": False})
    extra, metrics = build_dataset(cfg, tmp_path / "out")
    out, err = capsys.readouterr()
    assert f"data.total_tokens is unset: the mix holds {metrics['tokens']:,} tokens" in out
    assert metrics["tokens"] > 0 and metrics["tokens"] % 65 == 0
    assert "warning: data source 's': 1 truncated_tail" in err
    assert extra["sources"]["s"]["dropped"]["truncated_tail"]["docs"] == 1
