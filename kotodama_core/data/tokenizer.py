"""Loading the HF `tokenizers` tokenizer and describing it for manifests.

`path_or_id` is a local tokenizer.json, a folder holding one, or a Hugging Face hub id. A string that
looks like a path (has a separator, starts with '.' or '~', or ends in .json) must exist locally.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from kotodama_core.errors import UserError


class TokenizerError(UserError, ValueError):
    """The tokenizer cannot be found or loaded."""


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith((".", "~")) or text.endswith(".json")


def tokenizer_file(path_or_id: str, root: Path | None = None) -> Path | None:
    """The local tokenizer.json meant by `path_or_id`, None for a hub id; missing local path = error."""
    p = Path(path_or_id).expanduser()
    if not p.is_absolute() and root is not None:
        p = root / p
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"tokenizer folder {p.parent} holds no tokenizer.json")
        return p
    if p.is_file():
        return p
    if _looks_like_path(path_or_id):
        raise TokenizerError(f"tokenizer not found: {p} (a tokenizer.json file or a folder holding one)")
    return None


def load_tokenizer(path_or_id: str | Path, root: Path | None = None):
    """A `tokenizers.Tokenizer` from a local tokenizer.json (or its folder) or a hub id."""
    from tokenizers import Tokenizer

    local = tokenizer_file(str(path_or_id), root)
    if local is not None:
        try:
            return Tokenizer.from_file(str(local))
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise TokenizerError(f"{local}: not a valid tokenizer.json ({exc})") from exc
    try:
        return Tokenizer.from_pretrained(str(path_or_id))
    except Exception as exc:
        raise TokenizerError(f"tokenizer {path_or_id!r} is neither a local file nor a reachable hub id "
                             f"({exc})") from exc


@lru_cache(maxsize=4)
def cached_tokenizer(path_or_id: str, root: str | None = None):
    """One tokenizer per process (a Dask worker loads it on its first task)."""
    return load_tokenizer(path_or_id, Path(root) if root else None)


def tokenizer_sha256(path_or_id: str, root: Path | None = None) -> str:
    """sha256 of the tokenizer.json bytes (for a hub id: of its serialized JSON)."""
    local = tokenizer_file(str(path_or_id), root)
    if local is not None:
        return hashlib.sha256(local.read_bytes()).hexdigest()
    return hashlib.sha256(load_tokenizer(path_or_id).to_str().encode()).hexdigest()


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in mapping.items()}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special (added) tokens count 0 because they are not text.

    Summed over a token stream this gives the byte count of the text it encodes, which turns a loss in
    nats per token into bits per byte.
    """
    alphabet = _byte_level_alphabet()
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for piece, idx in vocab.items():
        if all(ch in alphabet for ch in piece):
            lengths[idx] = len(piece)  # one stand-in character per byte
        else:
            lengths[idx] = len(piece.encode("utf-8"))
    for idx in tokenizer.get_added_tokens_decoder():
        lengths[idx] = 0
    return lengths
