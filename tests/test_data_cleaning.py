import json

import pytest
import zstandard

from kotodama_core.config import validate
from kotodama_core.data.build import build_dataset
from kotodama_core.data.cleaning import clean_document, garbage_char_count, ocr_garbage_fraction
from kotodama_core.data.readers import DataInputError, iter_items
from tests.data_helpers import CORPUS, TOKENIZER, needs_corpus


def test_garbage_definition():
    assert garbage_char_count("Plain text, with $x^2 = y$ and `code` | ~ ^.") == 0
    assert garbage_char_count("bad \ufffd and \x07 and \ue000 and \U000e0080") == 4  # FFFD, BEL, private, Cn
    assert garbage_char_count("tlie ■ man ¦ was © here") == 3  # isolated OCR specks
    assert garbage_char_count("café ©2024 naïve 😀 ok") == 0  # symbols inside words, emoji: text
    text = "abcd efgh ■ ij"  # 11 visible characters, 1 garbage
    assert ocr_garbage_fraction(text) == pytest.approx(1 / 11)


def test_clean_document_reasons():
    assert clean_document("  \n\t ", 0.05)[1] == "empty"
    assert clean_document("word ■ ■ ■ text", 0.05)[1] == "ocr_garbage"
    assert clean_document("word ■ ■ ■ text", 0.5)[1] is None
    assert clean_document("The Ã©tÃ© was fine", 0.05)[0] == "The été was fine"  # ftfy repairs mojibake


def _bad_file(path):
    lines = [json.dumps({"text": "a good document number one"}).encode(),
             json.dumps({"text": "   "}).encode(),                               # empty
             json.dumps({"text": "■ ¦ ■ noise ■ ¦ ■"}).encode(),                  # ocr_garbage
             b'{"text": "broken',                                                 # malformed_json
             b'{"text": "bad \xff bytes"}',                                       # invalid_utf8
             json.dumps({"body": "no text field"}).encode(),                      # missing_text
             json.dumps({"text": "a good document number one"}).encode(),         # duplicate
             json.dumps({"text": "another good document"}).encode()]
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    (path.parent / "empty.jsonl").write_bytes(b"")


def _cfg(tmp_path, **data):
    return validate({"data": {"tokenizer": str(TOKENIZER), "seq_len": 7, "total_tokens": 70,
                              "drop_duplicates": True, "dask": {"workers": 0, "progress": False},
                              "sources": [{"name": "bad", "share": 1.0,
                                           "files": [str(tmp_path / "bad.jsonl.zst"), str(tmp_path / "empty.jsonl")]}],
                              **data}}).data


@needs_corpus
def test_bad_input_counted_per_reason_when_not_strict(tmp_path):
    _bad_file(tmp_path / "bad.jsonl.zst")
    extra, _ = build_dataset(_cfg(tmp_path, strict=False), tmp_path / "out")
    src = extra["sources"]["bad"]
    assert {k: v["docs"] for k, v in src["dropped"].items()} == {
        "empty": 1, "ocr_garbage": 1, "malformed_json": 1, "invalid_utf8": 1, "missing_text": 1,
        "duplicate": 1, "empty_file": 1}  # an empty file counts as one dropped slot
    assert src["docs_in"] == 9 and src["docs_out"] == 2
    assert src["repeat_factor"] > 1  # two short documents, cycled to fill 70 tokens


@pytest.mark.parametrize("reason,line", [("malformed json", b'{"text": "broken'),
                                         ("invalid utf8", b'{"text": "bad \xff bytes"}'),
                                         ("missing text", b'{"body": "x"}'), ("empty file", b"")])
def test_bad_input_is_an_error_when_strict(tmp_path, reason, line):
    (tmp_path / "one.jsonl").write_bytes(b'{"text": "fine"}\n' + line if line else b"")
    cfg = _cfg(tmp_path, sources=[{"name": "e", "share": 1.0, "files": [str(tmp_path / "one.jsonl")]}])
    with pytest.raises(DataInputError) as err:
        for _ in iter_items(cfg.sources[0], cfg):
            pass
    assert reason in str(err.value) and "data.strict=false" in str(err.value) and "one.jsonl" in str(err.value)


@needs_corpus
def test_filter_counts_on_the_shared_corpus_match_a_direct_recount(tmp_path):
    """Read the whole email file; the manifest's counts per reason equal a document-by-document recount."""
    cfg = validate({"data": {"tokenizer": str(TOKENIZER), "seq_len": 128, "drop_duplicates": True,
                             "ocr_garbage_threshold": 0.01, "dask": {"workers": 0, "progress": False},
                             "sources": [{"name": "email", "share": 1.0,
                                          "files": [str(CORPUS / "email.jsonl.zst")]}]}}).data
    extra, _ = build_dataset(cfg, tmp_path / "out")
    src = extra["sources"]["email"]
    raw = zstandard.ZstdDecompressor().stream_reader(open(CORPUS / "email.jsonl.zst", "rb")).read()
    docs = [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    expected, seen = {}, set()
    for text in docs:
        fixed, why = clean_document(text, 0.01)
        if why is None and fixed in seen:
            why = "duplicate"
        seen.add(fixed) if why is None else None
        if why:
            expected[why] = expected.get(why, 0) + 1
    assert src["docs_in"] == len(docs) == 3672
    assert {k: v["docs"] for k, v in src["dropped"].items()} == expected
    assert src["docs_out"] + sum(expected.values()) == len(docs)
    assert expected.get("duplicate", 0) > 0
