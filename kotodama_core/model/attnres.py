"""Block Attention Residuals (arXiv 2603.15031): a learned softmax mixture over depth sources.

A read with pseudo-query q and key-norm gain g over sources v_1..v_S (each (B, T, D)) is
    w_s = softmax_s(⟨q, RMSNorm_g(v_s)⟩)        (no 1/√d, softmax in at least float32)
    read = Σ_s w_s · v_s.
With q = 0 every w_s = 1/S, so the read is the mean of its sources.

Sources (see KotodamaLM): the token embedding, the sum of sublayer outputs of every completed block,
and the running sum of the open block. This single function is the unit a fused GPU kernel replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from kotodama_core.model.norm import rms_norm


def attn_res_read(sources: list[Tensor], query: Tensor, norm_weight: Tensor, eps: float,
                  return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Σ_s softmax_s(⟨q, RMSNorm_g(v_s)⟩)·v_s over the list `sources` (all (B, T, D), one dtype).

    Returns the read in the sources' dtype, and with return_weights the (B, T, S) mixture weights.
    Uses ⟨q, RMSNorm_g(v)⟩ = ⟨g∘q, v⟩·rsqrt(mean(v²) + eps) and a loop over sources, so autograd saves
    only (B, T) statistics and references to the sources — never a stacked (B, T, S, D) copy.
    Elementwise products rather than matmuls keep autocast from rounding the sources to bf16.
    """
    compute = torch.promote_types(sources[0].dtype, torch.float32)
    gq = norm_weight.to(compute) * query.to(compute)
    logits = []
    for v in sources:
        v = v.to(compute)
        inv_rms = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)
        logits.append((v * gq).sum(dim=-1) * inv_rms)
    weights = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, T, S)
    out = weights[..., 0:1] * sources[0].to(compute)
    for s in range(1, len(sources)):
        out = out + weights[..., s:s + 1] * sources[s].to(compute)
    out = out.to(sources[0].dtype)
    if return_weights:
        return out, weights
    return out


# ---------------------------------------------------------------- two-phase block reads
# Within one block the completed sources v_1..v_S do not change; only the open block's sum p does. The
# R reads of a block (queries q_r, gains g_r) therefore split exactly into
#   phase 1, once per block:   ℓ_rs = ⟨g_r∘q_r, v_s⟩·rsqrt(mean(v_s²) + eps),   lse_r = logsumexp_s ℓ_rs,
#                              mix_r = Σ_s exp(ℓ_rs − lse_r)·v_s
#   phase 2, at each read:     ℓ_rp = ⟨g_r∘q_r, p⟩·rsqrt(mean(p²) + eps),   w_p = σ(ℓ_rp − lse_r),
#                              read_r = (1 − w_p)·mix_r + w_p·p
# since the softmax over {v_1..v_S, p} gives p the weight exp(ℓ_rp) / (exp(lse_r) + exp(ℓ_rp)) and the
# completed sources their phase-1 weights times (1 − w_p). Each completed source is then read twice per
# block (forward) instead of twice per read, and its gradient is formed once per block instead of once
# per read and then summed — the dominant memory traffic of AttnRes at 28 layers.


def completed_sources_mix(done: list[Tensor], queries: Tensor, norm_weights: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
    """Phase 1 for R reads over the completed sources `done` (S ≥ 1 tensors (B, T, D), one dtype).

    queries and norm_weights are (R, D). Returns mix (R, B, T, D) in at least float32 and lse (R, B, T):
    mix_r = Σ_s softmax_s(ℓ_r·)·v_s and lse_r = logsumexp_s ℓ_rs with ℓ_rs as in attn_res_read.
    """
    if not done:
        raise ValueError("completed_sources_mix needs at least one completed source")
    compute = torch.promote_types(done[0].dtype, torch.float32)
    gq = (norm_weights.to(compute) * queries.to(compute))[:, None, None, :]  # (R, 1, 1, D)
    logits = []
    for v in done:
        v = v.to(compute)
        inv_rms = torch.rsqrt(v.pow(2).mean(dim=-1) + eps)                   # (B, T)
        logits.append((v * gq).sum(dim=-1) * inv_rms)                        # (R, B, T)
    logits = torch.stack(logits, dim=-1)                                      # (R, B, T, S)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1))
    mix = weights[..., 0:1] * done[0].to(compute)
    for s in range(1, len(done)):
        mix = mix + weights[..., s:s + 1] * done[s].to(compute)
    return mix, lse


def open_block_read(mix: Tensor, lse: Tensor, partial: Tensor, query: Tensor, norm_weight: Tensor,
                    eps: float) -> Tensor:
    """Phase 2: one read = the phase-1 mix (B, T, D) of the completed sources merged with the open
    block's sum `partial` (B, T, D) by its softmax weight σ(ℓ_p − lse). Returns partial's dtype."""
    compute = torch.promote_types(partial.dtype, torch.float32)
    p = partial.to(compute)
    gq = norm_weight.to(compute) * query.to(compute)
    logit = (p * gq).sum(dim=-1) * torch.rsqrt(p.pow(2).mean(dim=-1) + eps)
    w = torch.sigmoid(logit - lse).unsqueeze(-1)
    return (mix + w * (p - mix)).to(partial.dtype)


def merged_read_norm(mix: Tensor, lse: Tensor, partial: Tensor, query: Tensor, read_gain: Tensor,
                     read_eps: float, norm_weight: Tensor, norm_eps: float,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """A phase-2 read followed by the consuming layer's RMSNorm, y = RMSNorm_w(open_block_read(...)):
        h = mix + σ(ℓ_p − lse)·(p − mix),   y = h·rsqrt(mean(h²) + eps_n)·w.
    The reference for the fused kernel of attnres_triton (which never writes h); returns out_dtype
    (partial's dtype when None)."""
    h = open_block_read(mix, lse, partial, query, read_gain, read_eps)
    return rms_norm(h, norm_weight, norm_eps).to(out_dtype or partial.dtype)


# ---------------------------------------------------------------- the reads of one forward pass
# KotodamaLM keeps the stream of a forward pass as `OpenSum` and asks this section for each read: which
# formulation evaluates it (ReadSpec, from the runtime options) and the read followed by the consuming
# RMSNorm (read_norm). The model file then holds only the layer math.


@dataclass(frozen=True)
class AttnResRuntime:
    """How the AttnRes reads run; none of it changes the result beyond floating-point rounding.

    two_phase  evaluate each block's reads in two phases (completed_sources_mix once per block,
               open_block_read per read); False reads every source at every read (attn_res_read), the
               reference schedule. Traces always use the reference schedule (they record the weights).
    kernels    run phase 1 and each merge read fused with its RMSNorm (and the residual add before it) in
               the Triton kernels of attnres_triton, when the activations are on CUDA and Triton is
               installed; elsewhere the PyTorch formulation runs (train.attn_res_kernels sets it).
    mix_precision  "float32": phase 1 stores each read's mix in float32; "activation": in the activation
               dtype (activation_dtype: bf16 under bf16 autocast, else the stream's own dtype), which
               halves the traffic of the mixes and of their gradients and rounds each mix as the original
               code rounds each read (train.attn_res_mix_dtype sets it). This one changes the rounding.
    """

    two_phase: bool = True
    kernels: bool = False
    mix_precision: str = "float32"

    def __post_init__(self) -> None:
        if self.mix_precision not in MIX_PRECISIONS:
            raise ValueError(f"AttnRes mix_precision must be one of {MIX_PRECISIONS}, got {self.mix_precision!r}")

    def mix_dtype(self, stream: Tensor) -> torch.dtype:
        """The dtype phase 1 stores the mixes of `stream`'s reads in."""
        if self.mix_precision == "float32":
            return torch.promote_types(stream.dtype, torch.float32)
        return activation_dtype(stream)


MIX_PRECISIONS = ("float32", "activation")


class OpenSum(NamedTuple):
    """The open block's running sum (or the plain residual stream) as partial + pending: `pending` is the
    last sublayer's output, added by the next read (inside the fused kernel when kernels run it, else
    as one add before the read). `partial` is None right after a block boundary."""

    partial: Tensor | None
    pending: Tensor | None = None

    def total(self, stream_dtype: torch.dtype) -> Tensor:
        if self.pending is None:
            return self.partial
        return self.pending.to(stream_dtype) if self.partial is None else self.partial + self.pending


class ReadSpec(NamedTuple):
    """One AttnRes read. mode:
    plain     no AttnRes: the read is the stream itself
    per_read  one softmax over `inputs` (the completed sources) and the open block's sum, if any
    single    before the first block: one source, the open block's sum (its weight is exactly 1)
    first     a block's first read: `inputs` is its phase-1 mix of the completed sources
    merge     `inputs` = (mix, lse) of phase 1, merged with the open block's sum (open_block_read)
    `kernels`: a merge read and the RMSNorm after it run as one Triton kernel (read_norm)."""

    mode: str
    inputs: Any = None
    query: Tensor | None = None
    norm: Any = None
    key: tuple[str, int] | None = None
    kernels: bool = False


class BlockReads(NamedTuple):
    """Phase 1 of one block: each read's mix of the completed sources and its logsumexp, by read key."""

    mix: tuple[Tensor, ...]
    lse: tuple[Tensor, ...]
    index: dict[tuple[str, int], int]


def block_read_plan(starts: list[int], num_layers: int) -> dict[int, list[tuple[str, int]]]:
    """Reads of each AttnRes block in forward order, keyed by the block's first layer: ("attn", i) and
    ("mlp", i) for its layers, and ("final", -1) after the last block."""
    starts = [s for s in starts if s < num_layers]
    plan = {}
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else num_layers
        plan[start] = [(kind, i) for i in range(start, end) for kind in ("attn", "mlp")]
    if starts:
        plan[starts[-1]].append(("final", -1))
    return plan


def open_block(done: list[Tensor], keys: list[tuple[str, int]], params: list[tuple[Tensor, Any]],
               runtime: AttnResRuntime, phase_one: Callable = completed_sources_mix) -> BlockReads:
    """Phase 1 of the block whose reads are `keys` (params: each read's (query, norm)) over `done`."""
    from kotodama_core.model import attnres_triton

    queries = torch.stack([q for q, _ in params])
    gains = torch.stack([n.weight for _, n in params])
    eps = params[0][1].eps
    mix_dtype = runtime.mix_dtype(done[0])
    if runtime.kernels and attnres_triton.available(done[0]):
        mix, lse = attnres_triton.completed_sources_mix_triton(done, queries, gains, eps, mix_dtype)
    else:
        mix, lse = phase_one(done, queries, gains, eps)
        # The PyTorch formulation stacks the reads. One tensor per read: slicing the stack per read
        # would make each read's gradient a full-size zero-padded copy in backward (R of them per
        # block); unbind's backward is one stack. The kernels return one tensor per read already.
        # The mixes are rounded (their gradients with them) as the kernels store them.
        mix, lse = mix.to(mix_dtype).unbind(0), lse.unbind(0)
    return BlockReads(tuple(mix), tuple(lse), {k: r for r, k in enumerate(keys)})


def read_spec(block: BlockReads | None, done: list[Tensor], key: tuple[str, int], query: Tensor, norm: Any,
              opens_block: bool, two_phase: bool, runtime: AttnResRuntime) -> ReadSpec:
    """How the read `key` is evaluated; `opens_block`: the open block has no sum yet."""
    from kotodama_core.model import attnres_triton

    if not two_phase:
        return ReadSpec("per_read", list(done), query, norm, key)
    if block is None:
        return ReadSpec("single", None, query, norm, key)
    r = block.index[key]
    if opens_block:  # the block's first read sees only completed sources
        return ReadSpec("first", block.mix[r], query, norm, key)
    kernels = runtime.kernels and attnres_triton.available(block.mix[r])
    return ReadSpec("merge", (block.mix[r], block.lse[r]), query, norm, key, kernels)


def apply_read(spec: ReadSpec, partial: Tensor | None, stream_dtype: torch.dtype, rec: dict | None) -> Tensor:
    """Evaluate one read; with `rec`, per-read weights are recorded under rec["attn_res_weights"]."""
    if spec.mode == "plain":
        return partial
    if spec.mode == "first":
        return spec.inputs.to(stream_dtype)
    if spec.mode == "merge":
        mix, lse = spec.inputs
        return open_block_read(mix, lse, partial, spec.query, spec.norm.weight, spec.norm.eps)
    sources = [partial] if spec.mode == "single" else spec.inputs + ([partial] if partial is not None else [])
    if rec is None:
        return attn_res_read(sources, spec.query, spec.norm.weight, spec.norm.eps)
    out, weights = attn_res_read(sources, spec.query, spec.norm.weight, spec.norm.eps, return_weights=True)
    kind, layer = spec.key
    if kind != "final":
        rec["attn_res_weights"][layer][kind] = weights
    return out


def read_norm(spec: ReadSpec, stream: OpenSum, norm: Any, scale: float, stream_dtype: torch.dtype,
              rec: dict | None, index: int | None = None) -> tuple[OpenSum, Tensor]:
    """(the stream with its pending output added, norm(read) · scale) for the read `spec`.

    scale is the ln_scale factor (1.0 without it). A merge read with kernels runs as one fused kernel,
    the add included, returning the autocast dtype directly (the matmul after it casts to it anyway);
    otherwise the add, the read, then the norm. With `rec` and an `index`, the read (the layer's hidden
    state) is recorded under rec["hidden"]."""
    from kotodama_core.model import attnres_triton

    partial, delta = stream
    if spec.kernels and rec is None:
        if partial is None:  # the block's first sublayer output: nothing to add it to
            partial, delta = delta.to(stream_dtype), None
        mix, lse = spec.inputs
        out_dtype = activation_dtype(partial)
        weight = norm.weight * scale if scale != 1.0 else norm.weight
        fused = attnres_triton.merged_read_norm_triton(mix, lse, partial, spec.query, spec.norm.weight,
                                                       spec.norm.eps, weight, norm.eps, out_dtype, delta)
        partial, y = fused if delta is not None else (partial, fused)
        return OpenSum(partial), y
    partial = stream.total(stream_dtype)
    h = apply_read(spec, partial, stream_dtype, rec)
    if rec is not None and index is not None:
        rec["hidden"][index] = h
    n = norm(h)
    return OpenSum(partial), n * scale if scale != 1.0 else n


def activation_dtype(stream: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for the stream's device (the matmuls' input dtype), else
    the stream's own dtype."""
    device = stream.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else stream.dtype
