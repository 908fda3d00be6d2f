"""Loading the HF `tokenizers` tokenizer and describing it for manifests.

`path_or_id` is a local tokenizer.json, a folder holding one, or a Hugging Face hub id (`owner/name`,
loaded through the hub client and its cache). A string that looks like a path (starts with '/', '.' or
'~', ends in .json, or has more than one separator) must exist locally.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from kotodama_core.errors import UserError


class TokenizerError(UserError, ValueError):
    """The tokenizer cannot be found or loaded."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or text.endswith(".json") or not _HUB_ID.match(text)


def tokenizer_file(path_or_id: str, root: Path | None = None, key: str = "data.tokenizer") -> Path | None:
    """The local tokenizer.json meant by `path_or_id`, None for a hub id; a missing local path is an error
    naming the config `key` that gave it."""
    p = Path(path_or_id).expanduser()
    if not p.is_absolute() and root is not None:
        p = root / p
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"{key}: tokenizer folder {p.parent} holds no tokenizer.json")
        return p
    if p.is_file():
        return p
    if os.sep in path_or_id and _looks_like_path(path_or_id):
        raise TokenizerError(f"{key}: tokenizer not found: {p} (a tokenizer.json file or a folder holding one)")
    return None


def load_tokenizer(path_or_id: str | Path, root: Path | None = None, key: str = "data.tokenizer"):
    """A `tokenizers.Tokenizer` from a local tokenizer.json (or its folder) or a hub id; errors name `key`."""
    from tokenizers import Tokenizer

    local = tokenizer_file(str(path_or_id), root, key)
    if local is not None:
        try:
            return Tokenizer.from_file(str(local))
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise TokenizerError(f"{local}: not a valid tokenizer.json ({exc})") from exc
    tried = (root / str(path_or_id)) if root is not None else Path(str(path_or_id))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Tokenizer.from_pretrained(str(path_or_id))
    except Exception as exc:
        if offline:
            raise TokenizerError(f"{key} {str(path_or_id)!r}: no local file at {tried}, and the Hugging Face "
                                 f"hub cache holds no copy while HF_HUB_OFFLINE=1; download it once online, or "
                                 f"set {key} to a local tokenizer.json") from exc
        raise TokenizerError(f"{key} {str(path_or_id)!r}: no local file at {tried}, and the hub did not serve "
                             f"it ({type(exc).__name__}: {str(exc)[:200]})") from exc


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
