"""val_bpb: bits per byte of the data artifact's held-out `val/` windows, with per-token byte counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kotodama_core.eval.scoring import bits_per_byte, strided_token_nll


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet (bytes → printable unicode) used by SmolLM2's tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """bytes(id) for every id: the UTF-8 bytes the token stands for (special tokens: 0).

    Byte-level BPE tokens are decoded through the byte alphabet exactly; other tokens by UTF-8 length.
    """
    decoder = _byte_decoder()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(size, dtype=np.int64)
    for tid in range(size):
        tok = tokenizer.id_to_token(tid)
        if tok is None or tok in special:
            continue
        out[tid] = len(tok) if all(c in decoder for c in tok) else len(tok.encode("utf-8"))
    return out


def val_windows(data_dir: Path) -> list[Path]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    records = (manifest.get("splits") or {}).get("val") or []
    if not records:
        raise ValueError(f"{data_dir}: the data manifest lists no val shards")
    return [data_dir / r["path"] for r in records]


@torch.no_grad()
def val_bpb(model, data_dir: Path, *, byte_lengths: np.ndarray | None, max_windows: int | None,
            context: int, stride: int, device: torch.device) -> dict[str, float]:
    """bpb = Σ_t NLL_t / (ln 2 · Σ_t bytes(x_t)) over the scored targets of each val window.

    Without a tokenizer the byte count is tokens × the manifest's `bytes_per_token`.
    """
    from kotodama_core.data.shards import read_shard

    manifest = json.loads((data_dir / "manifest.json").read_text())
    total_nll, total_bytes, total_tokens, seen = 0.0, 0.0, 0, 0
    for shard in val_windows(data_dir):
        for window in read_shard(shard):
            if max_windows is not None and seen >= max_windows:
                break
            ids = torch.from_numpy(window.astype(np.int64))
            nll, n = strided_token_nll(model, ids, max_length=context, stride=stride, device=device)
            total_nll += float(nll.sum())
            total_tokens += n
            if byte_lengths is not None:
                total_bytes += float(byte_lengths[ids[1:].numpy()].sum())
            seen += 1
    if total_tokens == 0:
        raise ValueError(f"{data_dir}: no val tokens scored")
    if byte_lengths is None:
        bpt = manifest.get("bytes_per_token")
        if isinstance(bpt, dict):  # the data stage records it per split
            bpt = bpt.get("val")
        if not bpt:
            raise ValueError(f"{data_dir}: no tokenizer given and the manifest has no bytes_per_token")
        total_bytes = total_tokens * float(bpt)
    return {"val_bpb": bits_per_byte(total_nll, int(round(total_bytes))), "val_loss": total_nll / total_tokens,
            "val_tokens": float(total_tokens), "val_windows": float(seen)}


def val_bpb_for(model, data_dir: Path, settings, *, stride: int, context: int, device: torch.device,
                tokenizer=None) -> dict[str, float]:
    """`val_bpb` driven by a ValBpbConfig: exact per-token byte lengths from its tokenizer when it names one
    (`tokenizer`: that tokenizer, already loaded)."""
    lengths = None
    if settings.tokenizer:
        if tokenizer is None:
            from kotodama_core.eval.tokenizer import load_eval_tokenizer
            tokenizer = load_eval_tokenizer(settings.tokenizer, key="eval.val_bpb.tokenizer")
        lengths = token_byte_lengths(tokenizer)
    context = settings.context or context
    return val_bpb(model, data_dir, byte_lengths=lengths, max_windows=settings.max_windows, context=context,
                   stride=min(stride, context), device=device)
