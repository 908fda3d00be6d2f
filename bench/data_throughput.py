"""Data-stage throughput beside raw `Tokenizer.encode_batch` over the same text, in the same run.

    python bench/data_throughput.py [--workers 2] [--repeats 3] [--sources math email ...]

Reference: encode_batch (tokenizers' own thread pool, all cores) over the documents of the chosen
corpus-mix files, read and decoded beforehand (so the reference pays no I/O, JSON or cleaning). Pipeline:
build_dataset on a table of the same files (shares proportional to their SmolLM2 token counts,
total_tokens null, so every document is read, cleaned, tokenized and packed) with a Dask LocalCluster,
cluster start-up, reading, ftfy, OCR filter, packing, shuffle and shard writing included.

The two alternate (reference first on even repeats, pipeline first on odd ones), so load from other
processes on the machine falls on both; the 1-minute load average is printed beside each run. Ratio =
median pipeline tokens/s / median reference tokens/s (target >= 0.8); the per-repeat ratios are shown
too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the Dask workers)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def run_reference(tok, texts: list[str]) -> tuple[int, float, float]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tokens, time.perf_counter() - t0, cpu_seconds() - c0


def run_pipeline(cfg) -> tuple[int, float, float]:
    """Text tokens written (EOS separators not counted, so both sides count the same thing)."""
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = cpu_seconds(), time.perf_counter()
        extra, _ = build_dataset(cfg, Path(tmp) / "out")
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return sum(s["tokens_unique"] - s["docs_out"] for s in extra["sources"].values()), seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sources", nargs="+", default=sorted(TOKENS))
    args = ap.parse_args()
    files = {s: DATA / "corpus-mix" / f"{s}.jsonl.zst" for s in args.sources}
    texts = []
    for path in files.values():
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
        texts += [json.loads(line)["text"] for line in raw.split(b"\n") if line.strip()]
    tok = load_tokenizer(DATA / "smollm2-tokenizer")
    total = sum(TOKENS[s] for s in args.sources)
    cfg = validate({"data": {
        "tokenizer": str(DATA / "smollm2-tokenizer"), "seq_len": 2048,
        "dask": {"workers": args.workers, "progress": False},
        "sources": [{"name": s, "share": TOKENS[s] / total, "files": [str(p)]} for s, p in files.items()]}}).data
    print(f"documents: {len(texts)}  characters: {sum(map(len, texts))}  sources: {' '.join(args.sources)}  "
          f"cores: {os.cpu_count()}  workers: {args.workers}", flush=True)
    ref_rates, pipe_rates = [], []
    cpus = {"ref": [], "pipe": []}
    for rep in range(args.repeats):
        order = ("ref", "pipe") if rep % 2 == 0 else ("pipe", "ref")
        rates = {}
        for which in order:
            load = os.getloadavg()[0]
            if which == "ref":
                tokens, seconds, cpu = run_reference(tok, texts)
                label = "reference encode_batch"
            else:
                tokens, seconds, cpu = run_pipeline(cfg)
                label = f"data stage ({args.workers} workers)"
            rates[which] = tokens / seconds
            cpus[which].append(cpu)
            print(f"  repeat {rep}: {label:<24} {tokens} tokens in {seconds:6.2f} s = "
                  f"{rates[which]:>9,.0f} tokens/s, {cpu:6.2f} CPU-s   (load before: {load:.2f})", flush=True)
        ref_rates.append(rates["ref"])
        pipe_rates.append(rates["pipe"])
        print(f"  repeat {rep}: ratio {rates['pipe'] / rates['ref']:.3f}", flush=True)
    ref, pipe = statistics.median(ref_rates), statistics.median(pipe_rates)
    print(f"reference encode_batch: median {ref:,.0f} tokens/s over {args.repeats} repeats")
    print(f"data stage ({args.workers} workers, read + ftfy + OCR filter + tokenize + pack + shuffle + shards): "
          f"median {pipe:,.0f} tokens/s")
    print(f"ratio of medians: {pipe / ref:.3f} (target >= 0.8); per repeat: "
          + " ".join(f"{p / r:.3f}" for p, r in zip(pipe_rates, ref_rates)))
    print(f"CPU seconds (all processes), median: reference {statistics.median(cpus['ref']):.2f}, "
          f"data stage {statistics.median(cpus['pipe']):.2f}")


if __name__ == "__main__":
    main()
