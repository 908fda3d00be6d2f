"""The unit of parallel work: a chunk of raw documents in, cleaned token arrays out.

`process_chunk` is a pure function of its arguments, so the order of chunks (fixed by the readers)
alone decides the output, whichever worker computes which chunk.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from kotodama_core.data.cleaning import EMPTY, OCR_GARBAGE, clean_document
from kotodama_core.data.tokenizer import cached_tokenizer

REASON_CODES = {None: 0, EMPTY: 1, OCR_GARBAGE: 2}
REASON_NAMES = {code: name for name, code in REASON_CODES.items()}


def process_chunk(texts: list[str], tokenizer: str, tokenizer_root: str | None, ocr_threshold: float,
                  with_hashes: bool, dtype: str = "uint32") -> dict[str, np.ndarray]:
    """Clean and tokenize a chunk of documents.

    Returns per document: `reason` (REASON_CODES), `chars_out` (characters after repair), `lengths`
    (tokens, 0 when dropped), `hashes` (blake2b-128 of the repaired UTF-8 text, when asked); and
    `tokens`, the kept documents' ids concatenated (no EOS: the packer adds it) as `dtype` (the shard
    dtype, so a uint16 vocabulary ships half the bytes back from a worker).
    """
    # One thread per Dask worker: tokenizers' own thread pool would oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = cached_tokenizer(tokenizer, tokenizer_root)
    n = len(texts)
    reason = np.zeros(n, dtype=np.uint8)
    chars_out = np.zeros(n, dtype=np.int64)
    hashes = np.zeros((n if with_hashes else 0, 16), dtype=np.uint8)
    kept_index, kept_text = [], []
    for i, text in enumerate(texts):
        fixed, why = clean_document(text, ocr_threshold)
        chars_out[i] = len(fixed)
        reason[i] = REASON_CODES[why]
        if why is None:
            kept_index.append(i)
            kept_text.append(fixed)
            if with_hashes:
                hashes[i] = np.frombuffer(hashlib.blake2b(fixed.encode("utf-8"), digest_size=16).digest(),
                                          dtype=np.uint8)
    encodings = tok.encode_batch_fast(kept_text, add_special_tokens=False) if kept_text else []
    lengths = np.zeros(n, dtype=np.int64)
    parts = []
    for i, enc in zip(kept_index, encodings):
        ids = np.asarray(enc.ids, dtype=dtype)
        if ids.size == 0:  # every byte of the text was outside the vocabulary
            reason[i] = REASON_CODES[EMPTY]
            continue
        lengths[i] = ids.size
        parts.append(ids)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return {"reason": reason, "chars_out": chars_out, "lengths": lengths, "hashes": hashes, "tokens": tokens}
