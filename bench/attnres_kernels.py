"""Phase 1 of the two-phase AttnRes read: Triton kernels beside the PyTorch formulation, one block.

    python bench/attnres_kernels.py                       # proxy-108m's largest block, micro-batch 8
    python bench/attnres_kernels.py --sources 6 --reads 7 --tokens 65536

One block of the read schedule: S completed sources (B·T tokens × D, fp32, as the residual stream is) and
R reads. Times forward and forward+backward (upstream gradients for mix and lse) of
    triton     attnres_triton.completed_sources_mix_triton (stack + kernels + S gradient matmuls)
    compiled   torch.compile(attnres.completed_sources_mix)
    eager      attnres.completed_sources_mix
with CUDA events (median of --repeats after --warmup), and reports the max |difference| of the outputs
and gradients of each against eager. `bytes_min` is the traffic a one-pass implementation cannot avoid
(forward: read S sources, write R mixes; backward adds reading them and the R mix gradients and writing
S source gradients), so `gb_s` = bytes_min / time says how close a variant comes to the memory bandwidth.
The default shape is block 4 of proxy-108m (layers 12–20: 4 completed sources, 18 reads) at 8 × 4096.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kotodama_core.model import attnres_triton  # noqa: E402
from kotodama_core.model.attnres import completed_sources_mix  # noqa: E402

EPS = 1e-5


def time_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--reads", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=8 * 4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available() or attnres_triton.triton is None:
        raise SystemExit("needs CUDA and Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, args.tokens, args.dim)
    done = [torch.randn(shape, device="cuda", generator=g).requires_grad_() for _ in range(args.sources)]
    queries = (0.3 * torch.randn(args.reads, args.dim, device="cuda", generator=g)).requires_grad_()
    gains = (1 + 0.1 * torch.randn(args.reads, args.dim, device="cuda", generator=g)).requires_grad_()
    up_mix = torch.randn(args.reads, *shape, device="cuda", generator=g)
    up_lse = torch.randn(args.reads, *shape[:-1], device="cuda", generator=g)
    leaves = [*done, queries, gains]

    compiled = torch.compile(completed_sources_mix)
    variants = {
        "triton": lambda: attnres_triton.completed_sources_mix_triton(done, queries, gains, EPS),
        "compiled": lambda: compiled(done, queries, gains, EPS),
        "eager": lambda: completed_sources_mix(done, queries, gains, EPS),
    }

    def forward_backward(fn):
        mix, lse = fn()
        return torch.autograd.grad((mix * up_mix).sum() + (lse * up_lse).sum(), leaves)

    ref_out = [t.detach() for t in variants["eager"]()]
    ref_grads = forward_backward(variants["eager"])
    f32 = 4
    source_bytes = args.tokens * args.dim * f32
    bytes_fwd = (args.sources + args.reads) * source_bytes
    bytes_fwd_bwd = bytes_fwd + (args.sources + args.reads + args.sources) * source_bytes
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}))
    for name, fn in variants.items():
        with torch.no_grad():
            fwd_ms = time_ms(fn, args.repeats, args.warmup)
        both_ms = time_ms(lambda: forward_backward(fn), args.repeats, args.warmup)
        out = fn()
        grads = forward_backward(fn)
        err_out = max((a.detach() - b).abs().max().item() for a, b in zip(out, ref_out))
        err_grad = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
        print(json.dumps({"variant": name, "forward_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(both_ms, 3),
                          "forward_gb_s": round(bytes_fwd / fwd_ms / 1e6), "fwd_bwd_gb_s": round(bytes_fwd_bwd / both_ms / 1e6),
                          "max_err_out": err_out, "max_err_grad": err_grad}), flush=True)


if __name__ == "__main__":
    main()
