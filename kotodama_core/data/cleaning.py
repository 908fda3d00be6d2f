"""Document cleaning: ftfy repair, then the empty and OCR-garbage filters (docs/data.md explains why).

A garbage character is one of
  (a) U+FFFD, the replacement character left by a failed decode;
  (b) a control character (category Cc) other than tab, newline and carriage return;
  (c) a private-use (Co), surrogate (Cs) or unassigned (Cn) code point;
  (d) a non-ASCII symbol (category So or Sk, outside the emoji blocks U+1F000-U+1FAFF) standing in a
      whitespace-delimited token that holds no letter or digit: the isolated specks OCR makes of dirt,
      rules and ornaments ("■", "¦", "©", "˘" on their own);
  (e) a run of non-ASCII symbols, currency signs, vulgar fractions or other punctuation (So, Sk, Sc, Po,
      No but super- and subscript digits, middle dots excepted: "col·lecció", "ジョン・スミス"), or of "¬"
      (the line-break hyphen OCR leaves), with a letter right before it and right after it: garbage
      inside a word ("gov¢rnment", "th½t", "wo■■rd", "Agr§ement", "mo¬ney"); a symbol at a word's edge
      ("©2024", "50€", "Brand™") is kept. Box-drawing and block characters (U+2500-U+259F) count
      when a letter touches them on either side ("┤court");
  (f) in a word of four or more letters that mixes Latin with Greek or Cyrillic letters, the letters of
      the script in the minority ("Ηello" with a Greek Eta, "раssword" with Cyrillic a and p): OCR and
      homoglyph noise. Short mixed tokens ("πr", "μm") are kept for mathematics and units.

Speed. Both functions here run on every document, so neither loops over characters in Python:

- `fix_text` returns exactly `ftfy.fix_text(text)` but only hands ftfy the segments that ftfy could
  change (see `fix_text` for the proof); clean ASCII, the bulk of every corpus, is never copied.
- `garbage_char_count` looks every code point up in one flag table (numpy over the UTF-32 code
  units) and finds the symbol tokens of (d) with cumulative sums over the whitespace flags.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

EMPTY = "empty"
OCR_GARBAGE = "ocr_garbage"

# ---------------------------------------------------------------------------------------------------
# ftfy fast path
#
# ftfy.fix_text (default config) cuts the text into segments: each line including its "\n", a line
# longer than `max_decode_length` (1e6) cut every 1e6 characters from its start. Each segment is
# fixed independently by `ftfy.fix_and_explain(segment, config)`, and the outputs are concatenated.
# The only state carried between segments is `unescape_html`: "auto" until the first segment that
# contains "<", False from that segment on.
#
# A segment made only of the characters below is returned unchanged by every step ftfy applies under
# its default config (ftfy 6.3, read from its source):
#   unescape_html        HTML_ENTITY_RE "&#?[0-9A-Za-z]{1,24};" needs "&"             -> "&" excluded
#   fix_encoding         returns ASCII text as is (possible_encoding(text, "ascii"))
#   fix_c1_controls      U+0080-U+009F only (non-ASCII)
#   fix_latin_ligatures  LIGATURES: no ASCII key
#   fix_character_width  WIDTH_MAP: no ASCII key (U+3000, U+FF01-U+FFEF)
#   uncurl_quotes        U+02BC, U+2018-U+201F only
#   fix_line_breaks      "\r", U+0085, U+2028, U+2029                                 -> "\r" excluded
#   fix_surrogates       U+D800-U+DFFF only
#   remove_terminal_escapes  ANSI_RE needs ESC (U+001B)                              -> excluded
#   remove_control_chars CONTROL_CHARS: U+0000-U+0008, U+000B, U+000E-U+001F, U+007F, and non-ASCII
#                        -> every C0 control but tab and newline excluded (also FF, CR: conservative)
#   NFC normalization    identity on ASCII
# and since nothing changed, fix_and_explain stops after one pass. So the safe set is tab, newline and
# printable ASCII but "&"; any other character sends its whole segment to ftfy, with the
# `unescape_html` value ftfy itself would use there. tests/test_data_cleaning.py checks
# fix_text == ftfy.fix_text on every corpus-mix document and on adversarial cases.
# ---------------------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


@lru_cache(maxsize=1)
def _ftfy_configs():
    import ftfy

    auto = ftfy.TextFixerConfig(explain=False)  # what ftfy.fix_text uses when given no config
    return ftfy.fix_and_explain, auto, auto._replace(unescape_html=False), auto.max_decode_length


def fix_text(text: str) -> str:
    """ftfy's default repair (mojibake, HTML entities, line breaks, control characters, NFC).

    Identical to `ftfy.fix_text(text)`; only the segments holding a character outside the safe set
    above are passed to ftfy.
    """
    m = _UNSAFE.search(text)
    if m is None:
        return text
    fix_and_explain, auto, no_html, seg_max = _ftfy_configs()
    first_lt = text.find("<")
    out, done = [], 0
    while m is not None:
        p = m.start()
        line_start = text.rfind("\n", 0, p) + 1
        line_end = text.find("\n", p) + 1 or len(text)
        start = line_start + (p - line_start) // seg_max * seg_max  # ftfy's segment holding p
        end = min(start + seg_max, line_end)
        config = auto if first_lt < 0 or first_lt >= end else no_html
        out.append(text[done:start])
        out.append(fix_and_explain(text[start:end], config).text)
        done = end
        m = _UNSAFE.search(text, end)
    out.append(text[done:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# OCR garbage: per-code-point flags in one table, filled lazily 256 code points at a time (a document
# only ever touches a few such blocks), looked up for all characters of a document at once.
# ---------------------------------------------------------------------------------------------------
_GARBAGE, _SPACE, _WORD, _SYMBOL, _LETTER, _INWORD, _LATIN, _GREEK_CYRILLIC = 1, 2, 4, 8, 16, 32, 64, 128
_BOX = 256
_MIXED_WORD_MIN = 4
_MIDDLE_DOTS = frozenset({0xB7, 0x2027, 0x30FB, 0xFF65})
_BLOCK = 8  # log2 of the block size
_SPACE_RE, _WORD_RE = re.compile(r"\s"), re.compile(r"\w")
_BAD_CATEGORIES = frozenset({"Cc", "Co", "Cs", "Cn"})
_SYMBOL_CATEGORIES = frozenset({"So", "Sk"})
_KEPT_CONTROLS = frozenset("\t\n\r")
_flags = np.zeros(0x110000, dtype=np.uint16)
_known = np.zeros(0x110000 >> _BLOCK, dtype=bool)


def _char_flags(cp: int) -> int:
    ch = chr(cp)
    cat = unicodedata.category(ch)
    flags = 0
    if cp == 0xFFFD or (cat in _BAD_CATEGORIES and ch not in _KEPT_CONTROLS):
        flags |= _GARBAGE  # (a), (b), (c)
    if _SPACE_RE.match(ch):
        flags |= _SPACE  # exactly what \s matches, as in the token rule of (d)
    if _WORD_RE.match(ch):
        flags |= _WORD
    if cp > 0x7F and cat in _SYMBOL_CATEGORIES and not 0x1F000 <= cp <= 0x1FAFF and cp != 0xFFFD:
        flags |= _SYMBOL  # (d) candidates
    if cp > 0x7F and cp != 0xFFFD and cp not in _MIDDLE_DOTS and (
            cat in ("So", "Sk", "Sc", "Po") or cp == 0xAC
            or (cat == "No" and not unicodedata.name(ch, "").startswith(("SUPERSCRIPT", "SUBSCRIPT")))):
        flags |= _INWORD  # (e) candidates
    if 0x2500 <= cp <= 0x259F:
        flags |= _BOX
    if cat.startswith("L"):
        flags |= _LETTER
        script = unicodedata.name(ch, "").split(" ", 1)[0]
        if script == "LATIN":
            flags |= _LATIN
        elif script in ("GREEK", "CYRILLIC"):
            flags |= _GREEK_CYRILLIC  # (f)
    return flags


def _lookup(cps: np.ndarray, ascii_only: bool) -> np.ndarray:
    blocks = np.zeros(1, dtype=np.int64) if ascii_only else np.flatnonzero(
        np.bincount(cps >> _BLOCK, minlength=_known.size))
    for b in blocks[~_known[blocks]]:
        base = int(b) << _BLOCK
        _flags[base:base + (1 << _BLOCK)] = [_char_flags(cp) for cp in range(base, base + (1 << _BLOCK))]
        _known[b] = True
    return _flags[cps]


def _garbage_and_visible(text: str) -> tuple[int, int]:
    """(garbage characters, non-whitespace characters) of `text`."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    flags = _lookup(cps, text.isascii())
    count = int(np.count_nonzero(flags & _GARBAGE))
    space = (flags & _SPACE).astype(bool)
    visible = cps.size - int(np.count_nonzero(space))
    symbol = (flags & _SYMBOL).astype(bool)
    if symbol.any():
        # (d): whitespace-delimited tokens (maximal runs of non-space) without a word character; a
        # symbol candidate is never \w or \s, so it counts exactly when its token has no \w at all.
        token = np.cumsum(space[:-1] & ~space[1:]) if cps.size > 1 else np.zeros(0, dtype=np.int64)
        token = np.concatenate([[0], token])
        n = int(token[-1]) + 1
        has_word = np.bincount(token, weights=(flags & _WORD).astype(bool), minlength=n) > 0
        symbols = np.bincount(token, weights=symbol, minlength=n)
        count += int(symbols[~has_word].sum())
    inword = (flags & _INWORD).astype(bool)
    if inword.any():
        letter = (flags & _LETTER).astype(bool)
        count += _symbols_inside_words(inword, letter, (flags & _BOX).astype(bool))
    if (flags & _GREEK_CYRILLIC).any() and (flags & _LATIN).any():
        count += _mixed_script_letters(flags)
    return count, visible


def _symbols_inside_words(candidate: np.ndarray, letter: np.ndarray, box: np.ndarray) -> int:
    """(e): candidates in maximal candidate runs with a letter right before and right after the run (box
    drawing: a letter on either side)."""
    others = np.flatnonzero(~candidate)
    pos = np.flatnonzero(candidate)
    if others.size == 0:
        return 0
    k = np.searchsorted(others, pos)          # the first non-candidate after each candidate
    before = np.where(k > 0, others[np.maximum(k - 1, 0)], -1)
    after = np.where(k < others.size, others[np.minimum(k, others.size - 1)], -1)
    letter_before = (before >= 0) & letter[np.maximum(before, 0)]
    letter_after = (after >= 0) & letter[np.maximum(after, 0)]
    return int(np.count_nonzero((letter_before & letter_after) | (box[pos] & (letter_before | letter_after))))


def _mixed_script_letters(flags: np.ndarray) -> int:
    """(f): per word (maximal letter run) of >= 4 letters with Latin and Greek/Cyrillic, the minority."""
    letter = (flags & _LETTER).astype(bool)
    starts = letter & ~np.concatenate([[False], letter[:-1]])
    word = np.cumsum(starts) * letter                     # 0 = not in a word
    n = int(word.max()) + 1
    length = np.bincount(word, minlength=n)
    latin = np.bincount(word, weights=(flags & _LATIN).astype(bool), minlength=n)
    other = np.bincount(word, weights=(flags & _GREEK_CYRILLIC).astype(bool), minlength=n)
    mixed = (length >= _MIXED_WORD_MIN) & (latin > 0) & (other > 0)
    mixed[0] = False
    return int(np.minimum(latin, other)[mixed].sum())


def garbage_char_count(text: str) -> int:
    """Number of garbage characters in `text`, by the definition in the module docstring."""
    return _garbage_and_visible(text)[0]


def ocr_garbage_fraction(text: str) -> float:
    """garbage characters / non-whitespace characters (0.0 for a text with none of either).

    Whitespace is left out of the denominator so that the blank-line layout of scanned books does not
    dilute the noise.
    """
    count, visible = _garbage_and_visible(text)
    return count / visible if visible else 0.0


def clean_document(text: str, ocr_threshold: float) -> tuple[str, str | None]:
    """(repaired text, drop reason or None). Reasons: `empty`, `ocr_garbage` (fraction > threshold)."""
    fixed = fix_text(text)
    if not fixed.strip():
        return fixed, EMPTY
    if ocr_garbage_fraction(fixed) > ocr_threshold:
        return fixed, OCR_GARBAGE
    return fixed, None
