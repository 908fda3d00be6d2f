"""Loglikelihood requests per second: the adapter's batched scoring vs a one-request-at-a-time loop.

python bench/eval_throughput.py [--preset proxy-108m] [--requests 256] [--batch 32]
Both paths score the same (context, continuation) token pairs in the same run; results must agree.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kotodama_core.config import CONFIGS_ROOT, load_config
from kotodama_core.eval.scoring import continuation_logprobs
from kotodama_core.model import KotodamaLM


@torch.no_grad()
def naive(model, pairs, device):
    out = []
    for ctx, cont in pairs:
        ids = torch.tensor([ctx + cont], device=device)
        logp = F.log_softmax(model(ids[:, :-1])[0, -len(cont):].float(), -1)
        out.append(float(logp.gather(-1, ids[0, -len(cont):, None]).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="proxy-108m")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(CONFIGS_ROOT / "presets" / f"{args.preset}.yaml").model
    torch.manual_seed(0)
    model = KotodamaLM(cfg, device=device).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(args.requests):        # multiple-choice-like lengths: 20-120 context, 2-20 continuation
        n_ctx = int(torch.randint(20, 120, (1,), generator=gen))
        n_cont = int(torch.randint(2, 20, (1,), generator=gen))
        ids = torch.randint(0, cfg.vocab_size, (n_ctx + n_cont,), generator=gen).tolist()
        pairs.append((ids[:n_ctx], ids[n_ctx:]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    continuation_logprobs(model, pairs[:8], max_length=cfg.max_position_embeddings, batch_size=8, device=device)
    naive(model, pairs[:4], device)
    sync(); t0 = time.perf_counter()
    batched = continuation_logprobs(model, pairs, max_length=cfg.max_position_embeddings, batch_size=args.batch,
                                    device=device)
    sync(); t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = naive(model, pairs, device)
    sync(); t_naive = time.perf_counter() - t0
    err = max(abs(a[0] - b) for a, b in zip(batched, reference))
    print(f"device={device} preset={args.preset} requests={args.requests} batch={args.batch}")
    print(f"batched adapter: {args.requests / t_batched:.1f} req/s; one-at-a-time loop: {args.requests / t_naive:.1f} "
          f"req/s; speed-up x{t_naive / t_batched:.2f}; max |Δ logprob| = {err:.2e}")


if __name__ == "__main__":
    main()
