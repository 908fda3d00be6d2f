"""The tokenizer used by eval: the data stage's loader when present, else a local tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from kotodama_core.eval.config import resolve_repo_path

EOS_TOKEN = "<|endoftext|>"


def load_eval_tokenizer(name: str, key: str = "eval.tokenizer"):
    """A `tokenizers.Tokenizer` from a tokenizer.json path (relative = repo root) or a hub id; errors name
    the config `key`."""
    try:
        from kotodama_core.data.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    path = resolve_repo_path(name)
    if load_tokenizer is not None:
        return load_tokenizer(str(path) if path is not None and path.exists() else name, key=key)
    from tokenizers import Tokenizer

    if path is not None and Path(path).is_file():
        return Tokenizer.from_file(str(path))
    return Tokenizer.from_pretrained(name)


def eos_id(tokenizer) -> int:
    tid = tokenizer.token_to_id(EOS_TOKEN)
    if tid is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; cannot pick the end-of-text id")
    return tid
