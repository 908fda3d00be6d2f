"""Data-stage throughput beside raw `Tokenizer.encode_batch` over the same text, in the same run.

    python bench/data_throughput.py [--workers 2] [--sources math email ...]

Reference: encode_batch (tokenizers' own thread pool, all cores) over the documents of the chosen
corpus-mix files. Pipeline: build_dataset on a table of the same files (shares proportional to their
SmolLM2 token counts, total_tokens null, so every document is read, cleaned, tokenized and packed) with a
Dask LocalCluster. Ratio = pipeline tokens/s / reference tokens/s (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kotodama_core.config import validate  # noqa: E402
from kotodama_core.data.build import build_dataset  # noqa: E402
from kotodama_core.data.tokenizer import load_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENS = {"academic": 721942, "legal": 48963, "stackexchange": 582771, "math": 1791647, "code": 32335,
          "books": 1739411, "dialogue": 857286, "email": 1189397}  # corpus-mix/SOURCES.md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sources", nargs="+", default=sorted(TOKENS))
    args = ap.parse_args()
    files = {s: DATA / "corpus-mix" / f"{s}.jsonl.zst" for s in args.sources}
    texts = []
    for path in files.values():
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
        texts += [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    tok = load_tokenizer(DATA / "smollm2-tokenizer")
    t0 = time.perf_counter()
    ref_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    ref_s = time.perf_counter() - t0
    total = sum(TOKENS[s] for s in args.sources)
    cfg = validate({"data": {
        "tokenizer": str(DATA / "smollm2-tokenizer"), "seq_len": 2048,
        "dask": {"workers": args.workers, "progress": False},
        "sources": [{"name": s, "share": TOKENS[s] / total, "files": [str(p)]} for s, p in files.items()]}}).data
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extra, _ = build_dataset(cfg, Path(tmp) / "out")
        pipe_s = time.perf_counter() - t0
    pipe_tokens = sum(s["tokens_unique"] for s in extra["sources"].values())
    ref_rate, pipe_rate = ref_tokens / ref_s, pipe_tokens / pipe_s
    print(f"documents: {len(texts)}  sources: {' '.join(args.sources)}")
    print(f"reference encode_batch: {ref_tokens} tokens in {ref_s:.2f} s = {ref_rate:,.0f} tokens/s")
    print(f"data stage ({args.workers} workers, ftfy + OCR filter + tokenize + pack + shuffle + shards): "
          f"{pipe_tokens} tokens in {pipe_s:.2f} s = {pipe_rate:,.0f} tokens/s")
    print(f"ratio: {pipe_rate / ref_rate:.3f} (target >= 0.8)")


if __name__ == "__main__":
    main()
