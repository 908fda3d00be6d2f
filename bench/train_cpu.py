"""CPU tokens/s of the project's training step on the `tiny` preset, beside a plain reference step.

    .venv/bin/python bench/train_cpu.py [--steps 20] [--batch 16] [--seq 128] [--threads N]

Project step: KotodamaLM (AttnRes on), chunked head + z-loss, hybrid Muon/AdamW, clipping, batches from
a TokenLoader over a real data artifact when --data is given (else random tokens). Reference:
bench/reference_llama.py (no AttnRes, full logits, AdamW). Both run in this process, alternating, so the
ratio holds on a noisy machine. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.reference_llama import ReferenceLlama  # noqa: E402
from kotodama_core.config import load_config  # noqa: E402
from kotodama_core.model import KotodamaLM  # noqa: E402
from kotodama_core.optim import build_optimizer  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def time_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(CONFIGS / "presets/tiny.yaml")
    m = cfg.model
    torch.manual_seed(0)
    model = KotodamaLM(m)
    opt = build_optimizer(model, cfg.optim)
    ref = ReferenceLlama(m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads,
                         m.head_dim, m.intermediate_size, args.seq, m.rope_theta)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batch = torch.randint(0, m.vocab_size, (args.batch, args.seq + 1))

    def project_step():
        loss, _ = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reference_step():
        ref(batch[:, :-1], batch[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    time_steps(project_step, args.warmup)
    time_steps(reference_step, args.warmup)
    proj, base = [], []
    for _ in range(args.steps):  # alternate so drifts in machine load hit both equally
        proj += time_steps(project_step, 1)
        base += time_steps(reference_step, 1)
    tokens = args.batch * args.seq
    p_tok, r_tok = tokens / statistics.median(proj), tokens / statistics.median(base)
    print(json.dumps({"bench": "train_cpu", "preset": "tiny", "batch": args.batch, "seq": args.seq,
                      "threads": torch.get_num_threads(), "project_tok_s": round(p_tok), "reference_tok_s": round(r_tok),
                      "ratio": round(p_tok / r_tok, 3)}))


if __name__ == "__main__":
    main()
