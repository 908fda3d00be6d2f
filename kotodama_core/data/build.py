"""Building the token-window dataset: read → clean → tokenize (parallel) → mix → pack → shuffle → shards.

Mixing rule. The mix holds T' = floor(T / w) · w tokens (T = `total_tokens`, w = seq_len + 1) and
source s gets the quota q_s = floor(share_s · T'), the T' − Σ floor(·) leftover tokens going one each to
the largest fractional parts (ties: table order), so |q_s − share_s · T'| < 1 token. Documents are taken
in source order, each followed by EOS, until the quota is met; the last document is cut at the quota. A
source that runs out first is repeated from its start (its cleaned token stream, EOS included) and the
manifest records `repeat_factor` = q_s / unique tokens. With T null every source is read whole and
T = min_s(unique_s / share_s), the largest mix no source has to repeat for. The source streams are
concatenated in table order and cut into windows, so only the windows at source boundaries mix two
sources.

Order. Each source is cut into chunks of whole documents in read order; chunk results are consumed in
that order, so the token stream, and hence every shard byte, is independent of the worker count.
Windows of all sources are then shuffled together with `seed`; the first max(1, round(val_fraction · N))
windows of the permutation form `val`, the rest `train`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kotodama_core.data.chunks import REASON_NAMES, process_chunk
from kotodama_core.data.cleaning import EMPTY
from kotodama_core.data.config import DataConfig, SourceConfig
from kotodama_core.data.executor import make_executor, ordered_results
from kotodama_core.data.manifest_fields import describe_splits
from kotodama_core.data.readers import OVERSIZED, TRUNCATED_TAIL, DataInputError, Item, iter_items
from kotodama_core.data.shards import token_dtype, write_shard
from kotodama_core.data.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_file, tokenizer_sha256
from kotodama_core.progress import Progress

DUPLICATE = "duplicate"
SPILL = ".spill.bin"


@dataclass
class SourceStats:
    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    tokens_unique: int = 0
    tokens: int = 0
    start: int = 0  # offset of this source's stream in the spill file, in tokens

    def drop(self, reason: str, chars: int) -> None:
        entry = self.dropped.setdefault(reason, {"docs": 0, "chars": 0})
        entry["docs"] += 1
        entry["chars"] += chars


class Spill:
    """The mixed token streams of all sources, appended to one flat file before the shuffle."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.size = path, dtype, 0
        self.fh = open(path, "wb")

    def append(self, tokens: np.ndarray) -> None:
        tokens.astype(self.dtype, copy=False).tofile(self.fh)
        self.size += tokens.size

    def read(self, start: int, count: int) -> np.ndarray:
        self.fh.flush()
        return np.fromfile(self.path, dtype=self.dtype, count=count, offset=start * self.dtype.itemsize)

    def close(self) -> None:
        self.fh.close()


def _chunks(items: Iterator[Item], chunk_chars: int) -> Iterator[list[Item]]:
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += item.chars
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def mix_quotas(shares: dict[str, float], total: float, window: int,
               caps: dict[str, int] | None = None) -> dict[str, int]:
    """Tokens per source: largest-remainder split of floor(total / window) · window by share.

    `caps` (tokens available per source) keeps a leftover token off a source that has no more.
    """
    mix = math.floor(total / window) * window
    if mix == 0:
        raise DataInputError(f"a mix of {total:.0f} tokens holds no window of {window} tokens; "
                             f"raise data.total_tokens or lower data.seq_len")
    exact = {n: share * mix for n, share in shares.items()}
    quotas = {n: math.floor(x) for n, x in exact.items()}
    leftover = mix - sum(quotas.values())
    order = sorted(shares, key=lambda n: -(exact[n] - quotas[n]))  # stable: ties keep table order
    for name in order:
        if leftover == 0:
            break
        if caps is None or quotas[name] < caps[name]:
            quotas[name] += 1
            leftover -= 1
    if leftover:
        raise DataInputError(f"cannot place {leftover} tokens of the mix; sources are exhausted")
    empty = [n for n, q in quotas.items() if q == 0]
    if empty:
        raise DataInputError(f"sources {empty} get no token of a {mix}-token mix; "
                             f"raise data.total_tokens or their share")
    return quotas


def source_quotas(cfg: DataConfig) -> dict[str, int] | None:
    """Tokens per source for a fixed `total_tokens` (None when the mix size is decided by the data)."""
    if cfg.total_tokens is None:
        return None
    return mix_quotas({s.name: s.share for s in cfg.sources}, cfg.total_tokens, cfg.window)


class _Mixer:
    def __init__(self, cfg: DataConfig, spill: Spill, executor, progress) -> None:
        self.cfg, self.spill, self.executor, self.progress = cfg, spill, executor, progress
        self.seen: set[bytes] = set()
        root = tokenizer_file(cfg.tokenizer, cfg.root())
        self.tok_args = (str(root) if root else cfg.tokenizer, None)

    def take_all(self, sources: list[SourceConfig], quotas: dict[str, int] | None) -> dict[str, SourceStats]:
        """Append each source's documents (each + EOS) to the spill, in table order, until its quota
        (all its documents when `quotas` is None); a source that runs short is then repeated.

        One stream of chunk jobs runs through all sources, so the workers start on the next source
        while the last chunks of the previous one are still out (no drain at each source boundary);
        results are still consumed strictly in order, so the spill is the same as source by source.
        A source whose quota is met stops producing chunks; its chunks already submitted are skipped.
        """
        cfg = self.cfg
        eos = np.array([cfg.eos_id], dtype=self.spill.dtype)
        done: set[str] = set()

        def jobs():
            for source in sources:
                chunks = _chunks(iter_items(source, cfg), cfg.dask.chunk_chars)
                while source.name not in done:  # checked before reading the next chunk
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    yield (source.name, chunk), process_chunk, (
                        [it.text for it in chunk if it.text is not None], *self.tok_args,
                        cfg.ocr_garbage_threshold, cfg.drop_duplicates, self.spill.dtype.name)

        stats: dict[str, SourceStats] = {}
        unopened = list(sources)  # in table order; a source is opened when its stream starts in the spill

        def open_next() -> None:
            if stats:  # the open source is complete: repeat it up to its quota before the next one starts
                last = sources[len(stats) - 1]
                self._finish(last, stats[last.name], quotas[last.name] if quotas else None)
            stats[unopened[0].name] = SourceStats(start=self.spill.size)
            unopened.pop(0)

        results = ordered_results(self.executor, jobs(), in_flight=2 * self.executor.workers + 1)
        try:
            for (name, chunk), res in results:
                while name not in stats:  # sources without any chunk are opened (and finished) on the way
                    open_next()
                if name in done:
                    continue
                if self._consume(chunk, res, stats[name], quotas[name] if quotas else None, eos):
                    done.add(name)
        finally:
            results.close()
        while unopened:
            open_next()
        last = sources[-1]
        self._finish(last, stats[last.name], quotas[last.name] if quotas else None)
        return stats

    def _finish(self, source: SourceConfig, stats: SourceStats, quota: int | None) -> None:
        stats.tokens_unique = stats.tokens
        if quota is not None and stats.tokens < quota:
            self._repeat(source, stats, quota)
        self.progress.source_done(source.name, stats)

    def _consume(self, chunk: list[Item], res: dict[str, np.ndarray], stats: SourceStats, quota: int | None,
                 eos: np.ndarray) -> bool:
        """Account one chunk in document order; True once the quota is met."""
        ends = np.cumsum(res["lengths"])
        j = 0
        for item in chunk:
            stats.docs_in += 1
            stats.chars_in += item.chars
            if item.text is None:
                stats.drop(item.reason or "unreadable", item.chars)
                continue
            k, j = j, j + 1
            reason = REASON_NAMES[int(res["reason"][k])]
            if reason is not None:
                stats.drop(reason, item.chars)
                continue
            if self.cfg.drop_duplicates:
                key = res["hashes"][k].tobytes()
                if key in self.seen:
                    stats.drop(DUPLICATE, item.chars)
                    continue
                self.seen.add(key)
            stats.docs_out += 1
            stats.chars_out += int(res["chars_out"][k])
            doc = np.concatenate([res["tokens"][ends[k] - res["lengths"][k]:ends[k]], eos])
            if quota is not None and stats.tokens + doc.size >= quota:
                doc = doc[:quota - stats.tokens]
            self.spill.append(doc)
            stats.tokens += doc.size
            self.progress.update(doc.size)
            if quota is not None and stats.tokens >= quota:
                return True
        return False

    def _repeat(self, source: SourceConfig, stats: SourceStats, quota: int) -> None:
        if stats.tokens_unique == 0:
            raise DataInputError(f"source {source.name!r} yields no tokens after cleaning "
                                 f"(dropped: {stats.dropped})")
        unique = self.spill.read(stats.start, stats.tokens_unique)
        while stats.tokens < quota:
            part = unique[:quota - stats.tokens]
            self.spill.append(part)
            stats.tokens += part.size
            self.progress.update(part.size)


def _auto_quotas(cfg: DataConfig, stats: dict[str, SourceStats], work: Path, dtype: np.dtype) -> dict[str, int]:
    """Quotas from the data itself; rewrites the spill so the kept head of each source is contiguous."""
    caps = {s.name: stats[s.name].tokens_unique for s in cfg.sources}
    total = min(caps[s.name] / s.share for s in cfg.sources)
    quotas = mix_quotas({s.name: s.share for s in cfg.sources}, total, cfg.window, caps)
    old = np.memmap(work / SPILL, dtype=dtype, mode="r")
    compact = Spill(work / (SPILL + ".compact"), dtype)
    block = 1 << 24
    for s in cfg.sources:
        st = stats[s.name]
        start, st.start, st.tokens = st.start, compact.size, quotas[s.name]
        for b in range(start, start + st.tokens, block):
            compact.append(np.asarray(old[b:min(b + block, start + st.tokens)]))
    compact.close()
    del old
    (work / (SPILL + ".compact")).replace(work / SPILL)
    return quotas


def _write_split(work: Path, split: str, mm: np.ndarray, starts: np.ndarray, window: int, rows_per_shard: int,
                 token_bytes: np.ndarray) -> tuple[list[Path], int]:
    """Write the windows whose spill offsets are `starts` (in order) as shards; returns paths and UTF-8 bytes."""
    (work / split).mkdir(parents=True, exist_ok=True)
    paths, nbytes = [], 0
    block = max(1, (1 << 22) // window)
    offsets = np.arange(window, dtype=np.int64)
    for shard_index, first in enumerate(range(0, len(starts), rows_per_shard)):
        rows = starts[first:first + rows_per_shard]
        out = np.empty((rows.size, window), dtype=mm.dtype)
        for b in range(0, rows.size, block):
            out[b:b + block] = mm[rows[b:b + block, None] + offsets]
        nbytes += int(token_bytes[out].sum())
        path = work / split / f"shard_{shard_index:05d}.arrow"
        write_shard(path, out)
        paths.append(path)
    return paths, nbytes


class TokenProgress:
    """The data stage's progress (kotodama_core.progress): tokens of the mix so far, their rate and ETA,
    and one line per source when it completes (its documents in and out, and its tokens)."""

    def __init__(self, total: int | None, enabled: bool = True):
        self.bar = Progress("data", total) if enabled else None
        self.tokens, self.docs, self.t0 = 0, 0, time.perf_counter()

    def update(self, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.tokens, **{"tokens/s": round(rate)})

    def source_done(self, name: str, stats: SourceStats) -> None:
        self.docs += stats.docs_in
        if self.bar is not None:
            self.bar.update(self.tokens, force=True, **{"source": name, "docs in": stats.docs_in,
                                                        "docs out": stats.docs_out, "source tokens": stats.tokens})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def mix_size_line(cfg: DataConfig, quotas: dict[str, int], stats: dict[str, SourceStats]) -> str:
    """What an unset `data.total_tokens` produced: the mix size T = min_s(unique_s / share_s), floored to
    whole windows, and the source that bounds it (the one with the smallest unique_s / share_s)."""
    bound = min(cfg.sources, key=lambda s: stats[s.name].tokens_unique / s.share)
    return (f"data.total_tokens is unset: the mix holds {sum(quotas.values()):,} tokens "
            f"({sum(quotas.values()) // cfg.window:,} windows of {cfg.window}), bounded by source "
            f"{bound.name!r} ({stats[bound.name].tokens_unique:,} unique tokens at share {bound.share:g}); "
            f"set data.total_tokens to fix the size")


def skipped_input_warnings(stats: dict[str, SourceStats]) -> list[str]:
    """One warning per source whose broken compressed tail or oversized lines were skipped (lenient mode);
    the skipped bytes are also in the manifest under sources.<name>.dropped."""
    lines = []
    for name, st in stats.items():
        for reason in (TRUNCATED_TAIL, OVERSIZED):
            if reason in st.dropped:
                d = st.dropped[reason]
                lines.append(f"warning: data source {name!r}: {d['docs']} {reason} item(s) skipped, "
                             f"{d['chars']:,} bytes (recorded in the manifest under sources.{name}.dropped)")
    return lines


def build_dataset(cfg: DataConfig, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write train/ and val/ shards under `work`; returns (manifest extra fields, headline metrics)."""
    if not cfg.sources:
        raise DataInputError("data.sources is empty: extend a source table such as sources/corpus-mix")
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.root())
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if cfg.eos_id >= vocab_size:
        raise DataInputError(f"data.eos_id={cfg.eos_id} is outside the tokenizer's {vocab_size} ids")
    dtype, window = token_dtype(vocab_size), cfg.window
    quotas = source_quotas(cfg)
    spill = Spill(work / SPILL, dtype)
    executor = make_executor(cfg.dask)
    progress = TokenProgress(sum(quotas.values()) if quotas else None, enabled=cfg.dask.progress)
    try:
        mixer = _Mixer(cfg, spill, executor, progress)
        stats = mixer.take_all(cfg.sources, quotas)
    finally:
        progress.close()
        executor.close()
        spill.close()
    for line in skipped_input_warnings(stats):
        print(line, file=sys.stderr, flush=True)
    if quotas is None:
        quotas = _auto_quotas(cfg, stats, work, dtype)
        print(mix_size_line(cfg, quotas, stats), flush=True)

    mm = np.memmap(work / SPILL, dtype=dtype, mode="r")
    n_windows = mm.size // window
    starts = np.arange(n_windows, dtype=np.int64) * window
    perm = np.random.default_rng(cfg.seed).permutation(n_windows)
    n_val = 0 if cfg.val_fraction == 0 or n_windows < 2 else max(1, round(cfg.val_fraction * n_windows))
    token_bytes = token_byte_lengths(tokenizer)
    rows_per_shard = max(1, cfg.shard_tokens // window)
    paths, split_bytes = {}, {}
    for split, order in (("train", perm[n_val:]), ("val", perm[:n_val])):
        paths[split], split_bytes[split] = _write_split(work, split, mm, starts[order], window, rows_per_shard,
                                                         token_bytes)
    del mm
    (work / SPILL).unlink()

    total = sum(quotas.values())
    sources = {}
    for s in cfg.sources:
        st = stats[s.name]
        sources[s.name] = {
            "docs_in": st.docs_in, "chars_in": st.chars_in, "docs_out": st.docs_out, "chars_out": st.chars_out,
            "dropped": st.dropped, "tokens": quotas[s.name], "tokens_unique": st.tokens_unique,
            "repeat_factor": quotas[s.name] / st.tokens_unique,
            "share_target": s.share, "share_actual": quotas[s.name] / total,
        }
    extra = describe_splits(work, paths, window, vocab_size, cfg.eos_id)
    split_tokens = {k: sum(r["tokens"] for r in v) for k, v in extra["splits"].items()}
    extra["bytes_per_token"] = {k: (split_bytes[k] / split_tokens[k] if split_tokens[k] else None)
                                for k in paths}
    extra["sources"] = sources
    extra["tokenizer"] = {"path_or_id": cfg.tokenizer, "sha256": tokenizer_sha256(cfg.tokenizer, cfg.root())}
    extra["executor"] = cfg.dask.model_dump(mode="json")
    seconds = time.perf_counter() - t0
    metrics = {
        "tokens": total, "windows": n_windows, "train_windows": n_windows - n_val, "val_windows": n_val,
        "seconds": round(seconds, 3), "tokens_per_second": round(total / seconds, 1),
        "max_share_rel_error": max(abs(v["share_actual"] - v["share_target"]) / v["share_target"]
                                   for v in sources.values()),
    }
    return extra, metrics


__all__ = ["DUPLICATE", "EMPTY", "build_dataset", "mix_quotas", "source_quotas"]
