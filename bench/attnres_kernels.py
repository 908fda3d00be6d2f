"""The Triton AttnRes kernels beside the PyTorch formulation: phase 1 of one block, and one fused read.

    python bench/attnres_kernels.py                       # proxy-108m's largest block, micro-batch 8
    python bench/attnres_kernels.py --sources 6 --reads 7 --tokens 65536

phase 1 (one block of the read schedule): S completed sources (B·T tokens × D, fp32, as the residual
stream is) and R reads, forward and forward+backward (upstream gradients for mix and lse) of
    triton     attnres_triton.completed_sources_mix_triton (stack + kernels + S gradient matmuls)
    compiled   torch.compile(attnres.completed_sources_mix)
    eager      attnres.completed_sources_mix
merge (one read of the open block through the layer's RMSNorm, bf16 out as under autocast):
    triton     attnres_triton.merged_read_norm_triton (one kernel each way; h never written)
    compiled   torch.compile(attnres.merged_read_norm)
    norm_only  torch.compile(rms_norm) of the open block's sum alone: what a plain residual stream pays
               for the same norm, so triton − norm_only is what the read adds.
Times are CUDA-event medians of --repeats after --warmup (wall time of the calls, launches included),
and `gpu_fwd_bwd_ms`, the summed kernel time of one forward+backward under torch.profiler (what the
kernels cost inside a training step, where launches overlap with GPU work); each variant's outputs and
gradients are compared with eager (max |difference|). The triton merge variant runs at each launch shape
of --merge-shapes (forward rows×warps / backward rows×warps). `bytes_min` is the traffic a one-pass implementation cannot avoid
(phase 1 forward: read S sources, write R mixes; backward adds reading them and the R mix gradients and
writing S source gradients; merge forward: read mix and p, write y; backward: read mix, p and gy, write
the mix and p gradients), so `gb_s` = bytes_min / time says how close a variant comes to bandwidth.
The default phase-1 shape is block 4 of proxy-108m (layers 12–20: 4 completed sources, 18 reads) at
8 × 4096.

phase1_ops (the operators alone, mixes stored in bf16 as the model stores them under autocast) beside
flash-attn-res 0.1.12 when it is importable (carry its wheel; it is not a dependency):
    project_fwd / project_bwd   kotodama::attnres_block_mix and its backward op (∂q̃ kernel included)
    far_fwd / far_bwd           flash-attn-res' phase-1 forward and backward ops (their ∂q reduce included)
    *_fwd_bwd                   forward + backward through autograd with fixed upstream gradients
                                (torch.autograd.backward: no loss kernels in the timing)
    dq_matmuls / dq_kernel_*    ∂q̃ from one backward's coefficients: the S fp32 matmuls it once was,
                                against attnres_triton's reduction kernel at each --query-grad shape and
                                precision (`max_err`: largest difference ÷ largest entry)
at each --mix-warps choice (forward/backward warps per token program, forward reads unrolled up to) and
--mix-dtypes (fp32 mixes as the model keeps them, bf16 as flash-attn-res writes them) for the project. Each row gives the
traffic floor of a one-pass implementation and the time it implies at --bandwidth GB/s:
    forward  floor = S·N·D·4 (read fp32 sources) + R·N·D·m (write the mixes, m bytes each) + R·N·4 (lse)
    backward floor = S·N·D·4 (read sources) + R·N·D·m (read mix gradients) + 2·R·N·4 (read lse and its
                     gradient) + S·N·D·4 (write source gradients)
(m = 2 for bf16 mixes, 4 for fp32; flash-attn-res's rows use m = 2).
and `over_floor` = measured / floor time, plus `kernels`: each CUDA kernel's time in one call (profiler),
so the gap can be placed on the kernel that has it.
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
from kotodama_core.model.attnres import completed_sources_mix, merged_read_norm  # noqa: E402
from kotodama_core.model.norm import rms_norm  # noqa: E402

EPS = 1e-5
# The phase-1 mix dtypes by their command-line names.
MIX_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def gpu_ms(fn, repeats: int) -> float:
    """Summed CUDA kernel time per call of fn, from the profiler (launch gaps excluded)."""
    return sum(_kernel_times(fn, repeats, digits=None).values())


def measure(section: str, variants: dict, leaves: list, upstream: list, bytes_fwd: int, bytes_both: int,
            args, reference: str = "eager") -> None:
    """Print forward and forward+backward times and errors against `reference` for each variant."""

    def forward_backward(fn):
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum((o.float() * u).sum() for o, u in zip(outs, upstream))
        return torch.autograd.grad(loss, [x for x in leaves if x.requires_grad], allow_unused=True)

    def as_tuple(x):
        return x if isinstance(x, tuple) else (x,)

    ref_out = [t.detach().float() for t in as_tuple(variants[reference]())]
    ref_grads = forward_backward(variants[reference])
    for name, fn in variants.items():
        with torch.no_grad():
            fwd_ms = time_ms(fn, args.repeats, args.warmup)
        both_ms = time_ms(lambda: forward_backward(fn), args.repeats, args.warmup)
        gpu_both = gpu_ms(lambda: forward_backward(fn), args.repeats)
        row = {"section": section, "variant": name, "forward_ms": round(fwd_ms, 3), "fwd_bwd_ms": round(both_ms, 3),
               "gpu_fwd_bwd_ms": round(gpu_both, 3),
               "forward_gb_s": round(bytes_fwd / fwd_ms / 1e6), "fwd_bwd_gb_s": round(bytes_both / both_ms / 1e6)}
        out = as_tuple(fn())
        if not name.endswith("_only"):  # *_only variants compute a different function: no comparison
            grads = forward_backward(fn)
            row["max_err_out"] = max((a.detach().float() - b).abs().max().item() for a, b in zip(out, ref_out))
            row["max_err_grad"] = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)
                                      if a is not None and b is not None)
        print(json.dumps(row), flush=True)


def phase_one(args, g: torch.Generator) -> None:
    shape = (1, args.tokens, args.dim)
    done = [torch.randn(shape, device="cuda", generator=g).requires_grad_() for _ in range(args.sources)]
    queries = (0.3 * torch.randn(args.reads, args.dim, device="cuda", generator=g)).requires_grad_()
    gains = (1 + 0.1 * torch.randn(args.reads, args.dim, device="cuda", generator=g)).requires_grad_()
    upstream = [*torch.randn(args.reads, *shape, device="cuda", generator=g).unbind(0),
                *torch.randn(args.reads, *shape[:-1], device="cuda", generator=g).unbind(0)]
    compiled = torch.compile(completed_sources_mix)

    def per_read(mix, lse):  # one tensor per read, as the model uses them (the kernels return lists)
        return (*mix, *lse)

    variants = {
        "triton": lambda: per_read(*attnres_triton.completed_sources_mix_triton(done, queries, gains, EPS)),
        "compiled": lambda: per_read(*compiled(done, queries, gains, EPS)),
        "eager": lambda: per_read(*completed_sources_mix(done, queries, gains, EPS)),
    }
    source_bytes = args.tokens * args.dim * 4
    bytes_fwd = (args.sources + args.reads) * source_bytes
    bytes_both = bytes_fwd + (args.sources + args.reads + args.sources) * source_bytes
    measure("phase1", variants, [*done, queries, gains], upstream, bytes_fwd, bytes_both, args)


def merge(args, g: torch.Generator) -> None:
    shape = (1, args.tokens, args.dim)
    mix_dtype = MIX_DTYPES[args.merge_mix_dtype]
    mix = torch.randn(shape, device="cuda", generator=g).to(mix_dtype).requires_grad_()
    partial = (2 * torch.randn(shape, device="cuda", generator=g)).requires_grad_()
    lse = torch.randn(shape[:-1], device="cuda", generator=g).requires_grad_()
    query = (0.3 * torch.randn(args.dim, device="cuda", generator=g)).requires_grad_()
    gain = (1 + 0.1 * torch.randn(args.dim, device="cuda", generator=g)).requires_grad_()
    weight = (1 + 0.1 * torch.randn(args.dim, device="cuda", generator=g)).requires_grad_()
    upstream = [torch.randn(shape, device="cuda", generator=g)]
    call = (mix, lse, partial, query, gain, EPS, weight, EPS, torch.bfloat16)
    compiled = torch.compile(merged_read_norm)
    compiled_norm = torch.compile(lambda x, w: rms_norm(x, w, EPS).to(torch.bfloat16))
    def shaped(forward: str, backward: str):
        def run():
            for target, spec in ((attnres_triton.MERGE_FORWARD, forward), (attnres_triton.MERGE_BACKWARD, backward)):
                rows, warps = (int(x) for x in spec.split("x"))
                target.update(rows=rows, warps=warps)
            return attnres_triton.merged_read_norm_triton(*call)
        return run

    variants = {f"triton_{spec}": shaped(*spec.split("/")) for spec in args.merge_shapes.split(",")}
    variants.update({
        "compiled": lambda: compiled(*call),
        "eager": lambda: merged_read_norm(*call),
        "norm_only": lambda: compiled_norm(partial, weight),
    })
    f32, bf16 = 4, 2
    n = args.tokens * args.dim
    m = mix_dtype.itemsize
    bytes_fwd = n * (m + f32 + bf16)
    bytes_both = bytes_fwd + n * (m + f32 + bf16 + m + f32)
    measure("merge", variants, [mix, lse, partial, query, gain, weight], upstream, bytes_fwd, bytes_both, args)


def _kernel_times(fn, repeats: int = 5, digits: int | None = 4) -> dict[str, float]:
    """Per-kernel CUDA time (ms) of one call of fn, from the profiler (rounded to `digits` unless None)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    times = {e.key[:60]: e.self_device_time_total / repeats / 1e3 for e in prof.key_averages()
             if e.device_type == cuda and e.self_device_time_total > 0}
    return times if digits is None else {k: round(v, digits) for k, v in times.items()}


def query_grads(args, sources, folded, grad_mixes, grad_lse, row) -> None:
    """∂q̃ = Σ_s coef[s] @ sources[s] from one backward's coefficients: S matmuls (the form before
    _query_grad_kernel) against the kernel at each --query-grad shape; floor = read the S sources and coef."""
    n, d = sources[0].shape
    s_count, r_count = len(sources), folded.shape[0]
    mix_dtype = grad_mixes[0].dtype
    _mixes, lse, logits = torch.ops.kotodama.attnres_block_mix(sources, folded, EPS, mix_dtype)
    _grads, coef = attnres_triton._source_grads_and_coef(sources, folded, logits, lse, grad_mixes, grad_lse, EPS)
    floor = s_count * n * d * 4 + s_count * r_count * n * 4

    def matmuls():
        out = coef[0] @ sources[0]
        for k in range(1, s_count):
            out = out + coef[k] @ sources[k]
        return out
    want = matmuls()  # fp32 (this bench leaves TF32 off, PyTorch's default)
    row("dq_matmuls", matmuls, floor)
    scale = want.abs().max().item()
    for spec in args.query_grad.split(","):
        shape, precision = spec.split(":")
        tokens, cols, warps, stages = (int(x) for x in shape.split("x"))
        attnres_triton.QUERY_GRAD.update(tokens=tokens, cols=cols, warps=warps, stages=stages,
                                         precision={mix_dtype: precision})

        def err():  # largest difference from the fp32 matmuls, relative to ∂q̃'s largest entry
            return (attnres_triton._query_grad(sources, coef, mix_dtype) - want).abs().max().item() / scale
        row(f"dq_kernel_{spec}", lambda: attnres_triton._query_grad(sources, coef, mix_dtype), floor, err)


def phase_one_ops(args, g: torch.Generator) -> None:
    """The phase-1 operators alone against flash-attn-res (see the module docstring)."""
    n, d, s_count, r_count = args.tokens, args.dim, args.sources, args.reads
    stacked = torch.randn((s_count, 1, n, d), device="cuda", generator=g)
    sources = [v.view(n, d) for v in stacked.unbind(0)]
    folded = (0.3 * torch.randn(r_count, d, device="cuda", generator=g)).contiguous()
    grad_mix = torch.randn((r_count, n, d), device="cuda", generator=g).to(torch.bfloat16)
    grad_mixes = list(grad_mix.unbind(0))
    grad_lse = torch.randn((r_count, n), device="cuda", generator=g)
    bw = args.bandwidth * 1e9
    floor_fwd = s_count * n * d * 4 + r_count * n * d * 2 + r_count * n * 4
    floor_bwd = 2 * s_count * n * d * 4 + r_count * n * d * 2 + 2 * r_count * n * 4

    def row(name, fn, floor_bytes, reference=None):
        ms = time_ms(fn, args.repeats, args.warmup)
        out = {"section": "phase1_ops", "variant": name, "S": s_count, "R": r_count, "tokens": n, "D": d,
               "ms": round(ms, 4), "floor_ms": round(floor_bytes / bw * 1e3, 4),
               "over_floor": round(ms / (floor_bytes / bw * 1e3), 2), "gb_s": round(floor_bytes / ms / 1e6),
               "kernels": _kernel_times(fn)}
        if reference is not None:
            out["max_err"] = reference()
        print(json.dumps(out), flush=True)
        return ms

    mix_op, mix_bwd_op = torch.ops.kotodama.attnres_block_mix, torch.ops.kotodama.attnres_block_mix_backward
    results = {}
    defaults = (dict(attnres_triton.MIX_FORWARD), dict(attnres_triton.MIX_BACKWARD), dict(attnres_triton.QUERY_GRAD))
    for dtype_name in args.mix_dtypes.split(","):
        mix_dtype = MIX_DTYPES[dtype_name]
        g_mixes = [x.to(mix_dtype) for x in grad_mixes]
        # the floors with this mix dtype: the R mixes and their gradients at its width
        extra = r_count * n * d * (mix_dtype.itemsize - 2)
        for spec in args.mix_warps.split(","):
            fwd_w, bwd_w, unroll, *stages = (int(x) for x in spec.split("/"))
            attnres_triton.MIX_FORWARD.update(warps=fwd_w, unroll_reads=unroll)
            attnres_triton.MIX_BACKWARD.update(warps=bwd_w)
            if stages:  # given stages hold at every S
                attnres_triton.MIX_BACKWARD.update(stages=stages[0], pipelined_from=0)
            if len(stages) > 1:
                attnres_triton.MIX_FORWARD.update(stages=stages[1])
            tag = (f"{dtype_name}_w{fwd_w}/{bwd_w}_u{unroll}_s{attnres_triton._backward_stages(s_count)}"
                   f"/{attnres_triton.MIX_FORWARD['stages']}")
            mixes, lse, logits = mix_op(sources, folded, EPS, mix_dtype)
            results[f"project_fwd_{tag}"] = row(f"project_fwd_{tag}", lambda: mix_op(sources, folded, EPS, mix_dtype),
                                                floor_fwd + extra)
            results[f"project_bwd_{tag}"] = row(f"project_bwd_{tag}", lambda: mix_bwd_op(
                sources, folded, logits, lse, g_mixes, grad_lse, EPS), floor_bwd + extra)
            leaves = [v.detach().clone().requires_grad_() for v in sources]
            q_leaf = folded.detach().clone().requires_grad_()

            def project_both():
                for x in (*leaves, q_leaf):
                    x.grad = None  # no accumulation kernels in the timing
                m, l, _ = mix_op(leaves, q_leaf, EPS, mix_dtype)
                torch.autograd.backward([*m, l], [*g_mixes, grad_lse])
            results[f"project_fwd_bwd_{tag}"] = row(f"project_fwd_bwd_{tag}", project_both,
                                                    floor_fwd + floor_bwd + 2 * extra)
    attnres_triton.MIX_FORWARD.update(defaults[0])
    attnres_triton.MIX_BACKWARD.update(defaults[1])
    query_grads(args, sources, folded, g_mixes, grad_lse, row)
    attnres_triton.QUERY_GRAD.update(defaults[2])
    try:
        from flash_attn_res.ops import phase_1 as far
    except ImportError as exc:
        print(json.dumps({"section": "phase1_ops", "variant": "flash_attn_res", "error": f"not importable: {exc}"}))
        return
    far_fwd = far._phase_1_batched_attention_forward_with_aux_triton_op
    far_bwd = far._batched_attention_backward_triton_op
    outs, lses, inv_rms, far_logits = far_fwd(stacked, folded, EPS)
    mixes, lse, _ = mix_op(sources, folded, EPS, torch.bfloat16)

    def same_mix():  # both compute the same function: mixes and lse agree
        return max((outs.view(r_count, n, d).float() - torch.stack(mixes).float()).abs().max().item(),
                   (lses.view(r_count, n) - lse).abs().max().item())
    results["far_fwd"] = row("far_fwd", lambda: far_fwd(stacked, folded, EPS), floor_fwd, same_mix)
    grad_mix_far = grad_mix.view(r_count, 1, n, d)
    grad_lse_far = grad_lse.view(r_count, 1, n)
    results["far_bwd"] = row("far_bwd", lambda: far_bwd(stacked, folded, lses, inv_rms, far_logits, grad_mix_far,
                                                       grad_lse_far, True, EPS), floor_bwd)
    stacked_leaf = stacked.detach().clone().requires_grad_()
    q_far = folded.detach().clone().requires_grad_()

    def far_both():
        stacked_leaf.grad = q_far.grad = None
        o, l = far.phase_1_batched_attention_triton_op(stacked_leaf, q_far, EPS)
        torch.autograd.backward([o, l], [grad_mix_far, grad_lse_far])
    results["far_fwd_bwd"] = row("far_fwd_bwd", far_both, floor_fwd + floor_bwd)
    summary = {"section": "phase1_ops", "summary": True}
    for dtype_name in args.mix_dtypes.split(","):
        mine = {k: v for k, v in results.items() if k.startswith(f"project_fwd_bwd_{dtype_name}_")}
        best = min((v, k) for k, v in mine.items())
        summary[f"best_{dtype_name}"] = best[1]
        summary[f"{dtype_name}_over_far_fwd_bwd"] = round(best[0] / results["far_fwd_bwd"], 3)
        tag = best[1][len("project_fwd_bwd_"):]
        summary[f"{dtype_name}_ops_over_far_ops"] = round(
            (results[f"project_fwd_{tag}"] + results[f"project_bwd_{tag}"]) / (results["far_fwd"] + results["far_bwd"]), 3)
    print(json.dumps(summary), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--reads", type=int, default=18)
    ap.add_argument("--tokens", type=int, default=8 * 4096)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="phase1,merge",
                    help="comma list of sections: phase1, merge, phase1_ops")
    ap.add_argument("--mix-warps", default="1/1/8,1/1/0,2/2/8",
                    help="phase1_ops: launch choices of the phase-1 kernels, forward warps/backward warps/"
                         "reads unrolled up to (0: never)[/backward pipeline stages at every S[/forward stages]]")
    ap.add_argument("--query-grad", default="32x64x8x2:tf32x3,32x64x8x2:tf32,32x128x8x2:tf32",
                    help="phase1_ops: shapes of the ∂q̃ kernel, tokensxcolsxwarpsxstages:precision (tf32x3, ieee, tf32)")
    ap.add_argument("--mix-dtypes", default="fp32,bf16",
                    help="phase1_ops: mix dtypes to time (fp32: as the model stores them; bf16: as flash-attn-res)")
    ap.add_argument("--bandwidth", type=float, default=4300.0,
                    help="device memory bandwidth in GB/s for the traffic floor (H200: ~4300 measured by copy)")
    ap.add_argument("--merge-shapes", default="1x1/1x1,2x1/1x1,8x8/8x8",
                    help="launch shapes of the merge kernels to time, forward rowsxwarps/backward rowsxwarps")
    ap.add_argument("--merge-mix-dtype", default="fp32", choices=tuple(MIX_DTYPES),
                    help="the dtype of the phase-1 mix the merge reads (train.attn_res_mix_dtype)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or attnres_triton.triton is None:
        raise SystemExit("needs CUDA and Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}))
    sections = {"phase1": phase_one, "merge": merge, "phase1_ops": phase_one_ops}
    for name in args.only.split(","):
        if name not in sections:
            raise SystemExit(f"unknown section {name!r}; choose from {list(sections)}")
        sections[name](args, g)


if __name__ == "__main__":
    main()
