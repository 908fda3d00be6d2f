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


# --- the fast paths of kotodama_core.data.cleaning against their references -------------------------

def _reference_garbage_char_count(text):
    """The per-character definition of the module docstring, written plainly (the original code)."""
    import re
    import unicodedata
    count = len(re.findall(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text))
    if text.isascii():
        return count
    for ch in re.findall(r"[^\x00-\x7f]", text):
        if ch == "\ufffd" or unicodedata.category(ch) in {"Cc", "Co", "Cs", "Cn"}:
            count += 1
    for token in re.findall(r"(?<!\S)[^\s\w]+(?!\S)", text):
        count += sum(1 for ch in token if not ch.isascii() and not 0x1F000 <= ord(ch) <= 0x1FAFF
                     and ch != "\ufffd" and unicodedata.category(ch) in {"So", "Sk"})
    return count + _reference_inside_words(text) + _reference_mixed_scripts(text)


def _is_letter(ch):
    import unicodedata
    return unicodedata.category(ch).startswith("L")


def _reference_inside_words(text):
    """(e) per run of candidates: all of it when letters stand on both sides, its box characters when a
    letter stands on one side."""
    import unicodedata

    def candidate(ch):
        cat = unicodedata.category(ch)
        return (not ch.isascii() and ch != "\ufffd" and ch not in "\u00b7\u2027\u30fb\uff65" and
                (cat in ("So", "Sk", "Sc", "Po") or ch == "\u00ac" or
                 (cat == "No" and not unicodedata.name(ch, "").startswith(("SUPERSCRIPT", "SUBSCRIPT")))))
    count, i = 0, 0
    while i < len(text):
        if not candidate(text[i]):
            i += 1
            continue
        j = i
        while j < len(text) and candidate(text[j]):
            j += 1
        left = i > 0 and _is_letter(text[i - 1])
        right = j < len(text) and _is_letter(text[j])
        run = text[i:j]
        if left and right:
            count += len(run)
        elif left or right:
            count += sum(1 for ch in run if 0x2500 <= ord(ch) <= 0x259F)
        i = j
    return count


def _reference_mixed_scripts(text):
    """(f) per maximal run of letters of 4 or more: the minority of Latin against Greek and Cyrillic."""
    import unicodedata
    count, i = 0, 0
    while i < len(text):
        if not _is_letter(text[i]):
            i += 1
            continue
        j = i
        while j < len(text) and _is_letter(text[j]):
            j += 1
        scripts = [unicodedata.name(ch, "").split(" ", 1)[0] for ch in text[i:j]]
        latin = scripts.count("LATIN")
        other = scripts.count("GREEK") + scripts.count("CYRILLIC")
        if j - i >= 4 and latin and other:
            count += min(latin, other)
        i = j
    return count


def _reference_visible(text):
    import re
    return len(text) - len(re.findall(r"\s", text))


def _corpus_documents():
    docs = {}
    for path in sorted(CORPUS.glob("*.jsonl.zst")):
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
        docs[path.name.split(".")[0]] = [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    return docs


_FTFY_CASES = [
    "", "\n", "\n\n", "plain ascii\nlines\n", "no newline at end", "tab\tand\fform feed\n",
    "AT&amp;T &lt;b&gt; &EACUTE; &#x2019; &#8217; &hellip; &notanentity; this&not that",
    "&amp; first\n<b>tag</b> then\n&amp; after the tag\n",   # '<' turns entity decoding off from its line on
    "<p>\n&amp;\n", "x &amp; <y>\n", "&amp;\n&amp;<\n&amp;\n",
    "crlf\r\nline\r\nend\r\n", "cr\ronly\r", "\r", "\r\n", "a\r\n\r\nb", "\n\r", "trail\r",
    "\x1b[31mred\x1b[0m plain \x1b[1;32mgreen\x1b[m\n", "\x1b alone", "\x1b[",
    "".join(map(chr, range(32))) + "\x7f", "nul\x00in\x00text", "\x0b\x0c\x1c\x1d\x1e\x1f",
    "The Ã©tÃ© was fine", "â€œquotedâ€\x9d and donâ€™t", "voilÃ le travail", "sÃ³", "\x80\x93 c1",
    "ﬁne ﬂow", "ＬＯＵＤ　ＮＯＩＳＥＳ", "‘curly’ “quotes”", "surrogate \ud83d\ude00 and lone \ud800",
    "line\u2028sep\u2029para\x85nel", "e\u0301 NFD", "\ufeffbom", "\ufffd replacement", "ascii line\nÃ© line\nascii\n",
    "a" * 999_999 + "Ã©" + "b" * 10,               # mojibake cut by ftfy's 1e6-character segment boundary
    "a" * 1_500_000 + "é" + "b" * 600_000 + "\n&amp;",  # unsafe character in the 2nd segment of a long line
    "<" + "a" * 1_200_000 + "&amp;\nx&amp;",         # '<' in a long line's first segment
]


def test_fix_text_equals_ftfy_on_adversarial_cases():
    import ftfy

    from kotodama_core.data.cleaning import fix_text
    for text in _FTFY_CASES:
        assert fix_text(text) == ftfy.fix_text(text), repr(text[:80])


def test_fix_text_equals_ftfy_on_random_mixtures_with_short_segments(monkeypatch):
    """Random strings of the characters each ftfy step acts on; a 7-character segment limit exercises
    the segment arithmetic that a 1e6 limit only reaches on huge lines."""
    import random

    import ftfy

    from kotodama_core.data import cleaning
    pieces = ["a", "b ", " ", "\n", "\n", "\r", "\r\n", "&", "amp;", "&lt;", "&#x41;", "&EACUTE;", "<", ">",
              "\x1b[", "0m", "\x00", "\x07", "\x7f", "\t", "\x0c", "é", "Ã", "©", "â€", "™", "\x9d", "\x85",
              "\u2028", "ﬁ", "’", "“", "Ａ", "e\u0301", "\ud800", "■", "\ufffd", "😀"]
    fix_and_explain, auto, no_html, _ = cleaning._ftfy_configs()
    short = ftfy.TextFixerConfig(explain=False, max_decode_length=7)
    monkeypatch.setattr(cleaning, "_ftfy_configs",
                        lambda: (fix_and_explain, short, short._replace(unescape_html=False), 7))
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        assert cleaning.fix_text(text) == ftfy.fix_text(text, short), repr(text)


def test_garbage_count_equals_the_per_character_definition():
    import random

    from kotodama_core.data.cleaning import garbage_char_count, ocr_garbage_fraction
    pieces = ["a", "Z", "9", "_", " ", "  ", "\n", "\t", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u3000",
              "\u2028", "-", "|", "$", "=", "■", "¦", "©", "˘", "°", "€", "😀", "\U0001f9d1", "\ufffd", "\x00",
              "\x07", "\x7f", "\x9d", "\ue000", "\U000e0080", "\U0010fffe", "\ud800", "é", "ß", "一", "\u0301",
              "²", "½", "\u2460", "\u0660", "§", "¬", "·", "┤", "▓", "¢", "α", "Η", "а", "р", "×"]
    rng = random.Random(5)
    cases = ["", " ", "■", " ■ ", "a■", "■a", "■_", "_■", "©2024", "café ©2024 naïve 😀 ok", "tlie ■ man ¦ was © here"]
    cases += ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30))) for _ in range(5000)]
    for text in cases:
        assert garbage_char_count(text) == _reference_garbage_char_count(text), repr(text)
        visible = _reference_visible(text)
        expected = _reference_garbage_char_count(text) / visible if visible else 0.0
        assert ocr_garbage_fraction(text) == expected, repr(text)


@needs_corpus
def test_fast_cleaning_equals_ftfy_and_the_reference_on_every_corpus_document():
    """The proof that the fast paths change no output: every document of the shared corpus-mix."""
    import ftfy

    from kotodama_core.data.cleaning import fix_text, garbage_char_count, ocr_garbage_fraction
    n = 0
    for source, docs in _corpus_documents().items():
        for text in docs:
            fixed = ftfy.fix_text(text)
            assert fix_text(text) == fixed, (source, n)
            for t in (text, fixed):
                assert garbage_char_count(t) == _reference_garbage_char_count(t), (source, n)
            visible = _reference_visible(fixed)
            expected = _reference_garbage_char_count(fixed) / visible if visible else 0.0
            assert ocr_garbage_fraction(fixed) == expected, (source, n)
            n += 1
    assert n > 15000
