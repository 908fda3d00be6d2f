"""KotodamaLM: a Llama-family decoder with QK-norm, GQA, SwiGLU, tied embeddings and Block AttnRes.

One layer i, with h the sublayer input:
    attention  a = o_proj(SDPA_causal(rope(q_norm(q_proj n)), rope(k_norm(k_proj n)), v_proj n)),
               n = attn_norm(h)
    MLP        m = down_proj(silu(gate_proj n) · up_proj n),   n = ffn_norm(h)
Plain residual stream (attn_res off): x ← x + a(x); x ← x + m(x); logits = head(norm(x)).
Block Attention Residuals (attn_res on): a list `done` of completed block sums and an open `partial`
(initially the token embedding). For layer i:
    h = read(done + [partial], attn_res_query_i, attn_res_norm_i)
    if i starts a block: done.append(partial); partial = None
    partial = a(h) if partial is None else partial + a(h)
    h = read(done + [partial], mlp_res_query_i, mlp_res_norm_i)
    partial = partial + m(h)
and finally x = read(done + [partial], final_res_query, final_res_norm), logits = head(norm(x)).
`read` is attnres.attn_res_read. The residual stream is kept in the embedding's dtype (fp32 under
autocast) so block sums do not accumulate in bf16. Training forwards (no trace) evaluate the same reads
in two phases per block (attnres.completed_sources_mix once when a block opens, open_block_read at each
read): the same function, with each completed source read once per block instead of once per read.
Each layer runs through `layer_step` (its two reads and two sublayers), the unit that compile_regions
compiles once for all layers; the trace and the per-read schedule go through the same function.
How each read is evaluated (ReadSpec, read_norm, the Triton or PyTorch choice, the runtime options) is
attnres.py's business; this file holds the layer math.

Optional techniques (cfg.techniques, all off by default; each in techniques/ with its formula):
    xsa_last_n       attention output of the last N layers made orthogonal to the own value (xsa.py)
    rotary_dims      RoPE on the first k head dims only (rope.py)
    bigram_logits    logits += B[input token]; logit_softcap: logits <- c·tanh(logits/c) (bigram_logits.py)
    bigram_hash      emb += s·proj(table[hash(prev, cur)]) (bigram_hash.py)
    value_embed      v += λ·E[ids] at chosen layers, or x += λ·E[ids] before them (value_embed.py)
    ln_scale         n = attn_norm(h)/sqrt(i+1) and ffn_norm(h)/sqrt(i+1) at layer i (0-based)
    recurrence       layers start..end repeated R times, R set by set_training_progress (recurrence.py)
    parallel_residual_start  from layer k on: x <- x + a(attn_norm x) + m(ffn_norm x), one shared input
    mlp              "leaky_relu2": m = down_proj(leaky_relu(up_proj n, 0.5)²), no gate_proj (mlp.py)
    init             "orthogonal": semi-orthogonal hidden matrices, output projections × 1/sqrt(2L) (init.py)
    unet_skips       x += w_i·y_i before decoder layer L−1−i, y_i the stream after layer i < L//2 (unet.py)
Recurrence, U-Net skips, parallel residuals and residual-stream value embeddings act on the plain residual
stream and are rejected with attn_res (config error). With every technique off no technique module
exists, so the state dict and parameter count are the published ones.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kotodama_core.model.attnres import (AttnResRuntime, BlockReads, OpenSum, ReadSpec, apply_read, block_read_plan,
                                        completed_sources_mix, open_block, read_norm, read_spec)
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.loss import chunked_lm_loss
from kotodama_core.model.norm import RMSNorm
from kotodama_core.model.rope import RotaryEmbedding, apply_rope
from kotodama_core.model.techniques.bigram_hash import BigramHashEmbedding
from kotodama_core.model.techniques.bigram_logits import BigramLogitHead, bigram_bias, softcap
from kotodama_core.model.techniques.init import orthogonal_, output_projection_gain
from kotodama_core.model.techniques.mlp import LeakyReLUSquaredMLP
from kotodama_core.model.techniques.recurrence import DepthRecurrence, repeats_at
from kotodama_core.model.techniques.unet import UNetSkips
from kotodama_core.model.techniques.value_embed import ValueEmbeddings
from kotodama_core.model.techniques.xsa import exclusive_self_attention

# enable_gqa arrived in torch 2.5; older builds repeat the KV heads instead.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.get_default_device()


def _linear(in_features: int, out_features: int, device) -> nn.Linear:
    # Built on meta and materialized uninitialized: init_weights is the only RNG consumer, so
    # torch.manual_seed(s) + construction equals torch.manual_seed(s) + init_weights().
    return nn.Linear(in_features, out_features, bias=False, device="meta").to_empty(device=_device(device))


def _embedding(num: int, dim: int, device) -> nn.Embedding:
    return nn.Embedding(num, dim, device="meta").to_empty(device=_device(device))


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B, H, T, d), k/v (B, KV, T, d) -> (B, H, T, d) with a causal mask and GQA."""
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), is_causal=True)


def explicit_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The same attention with probabilities softmax(q·kᵀ/√d + causal mask) made explicit (fp32)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ v.to(compute)).to(q.dtype), probs


class Attention(nn.Module):
    def __init__(self, cfg: KotodamaConfig, device=None, xsa: bool = False):
        super().__init__()
        self.xsa = xsa
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_kv_heads, hd
        self.q_proj = _linear(d, cfg.num_attention_heads * hd, device)
        self.k_proj = _linear(d, cfg.num_kv_heads * hd, device)
        self.v_proj = _linear(d, cfg.num_kv_heads * hd, device)
        self.o_proj = _linear(cfg.num_attention_heads * hd, d, device)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, device=device)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, device=device)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor,
                v_extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, d), k and v (B, KV, T, d), QK-normed and rotated; a KV cache appends k, v here.
        v_extra (B, T, KV·d), a value embedding, is added to the values."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x)
        if v_extra is not None:
            v = v + v_extra.to(v.dtype)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, return_probs: bool = False,
                v_extra: Tensor | None = None):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin, v_extra)
        if return_probs:
            out, probs = explicit_causal_attention(q, k, v)
        else:
            out, probs = causal_attention(q, k, v), None
        if self.xsa:
            out = exclusive_self_attention(out, v)
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return (out, probs) if return_probs else out


class SwiGLU(nn.Module):
    def __init__(self, cfg: KotodamaConfig, device=None):
        super().__init__()
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, device)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, device)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, device)

    def forward(self, x: Tensor, return_act: bool = False):
        act = F.silu(self.gate_proj(x)) * self.up_proj(x)
        out = self.down_proj(act)
        return (out, act) if return_act else out


class Layer(nn.Module):
    def __init__(self, cfg: KotodamaConfig, index: int = 0, device=None):
        super().__init__()
        d, tech = cfg.hidden_size, cfg.techniques
        # Static per-layer switches (Python values, so torch.compile specializes on them).
        self.norm_scale = 1.0 / math.sqrt(index + 1) if tech.ln_scale else 1.0
        start = tech.parallel_residual_start
        self.parallel = start is not None and index >= start
        self.attn_norm = RMSNorm(d, cfg.norm_eps, device=device)
        self.attn = Attention(cfg, device=device, xsa=index >= cfg.num_layers - tech.xsa_last_n)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, device=device)
        if tech.mlp == "leaky_relu2":
            self.ffn = LeakyReLUSquaredMLP(d, cfg.intermediate_size, lambda i, o: _linear(i, o, device))
        else:
            self.ffn = SwiGLU(cfg, device=device)
        if cfg.attn_res:
            self.attn_res_query = nn.Parameter(torch.zeros(d, device=device))
            self.attn_res_norm = RMSNorm(d, cfg.norm_eps, device=device)
            self.mlp_res_query = nn.Parameter(torch.zeros(d, device=device))
            self.mlp_res_norm = RMSNorm(d, cfg.norm_eps, device=device)


class KotodamaLM(nn.Module):
    """The Kotodama decoder. State-dict keys follow the published checkpoints exactly.

    `loss_chunk_tokens` is the number of tokens whose logits the training loss materializes at once.
    `attn_res_runtime` says how the AttnRes reads run (two-phase, Triton kernels: attnres.AttnResRuntime);
    it never changes the result beyond rounding, and the forward pass returns the same whatever it says.
    """

    def __init__(self, cfg: KotodamaConfig, device=None, loss_chunk_tokens: int = 4096,
                 attn_res_runtime: AttnResRuntime = AttnResRuntime()):
        super().__init__()
        if loss_chunk_tokens <= 0:
            raise ValueError(f"loss_chunk_tokens must be positive, got {loss_chunk_tokens}")
        self.cfg = cfg
        self.loss_chunk_tokens = loss_chunk_tokens
        self.attn_res_runtime = attn_res_runtime
        d = cfg.hidden_size
        self.embed_tokens = _embedding(cfg.vocab_size, d, device)
        self.layers = nn.ModuleList(Layer(cfg, i, device=device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.norm_eps, device=device)
        if cfg.attn_res:
            self.final_res_query = nn.Parameter(torch.zeros(d, device=device))
            self.final_res_norm = RMSNorm(d, cfg.norm_eps, device=device)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(d, cfg.vocab_size, device)
        tech = cfg.techniques
        self.rope = RotaryEmbedding(tech.rotary_dims or cfg.head_dim, cfg.max_position_embeddings,
                                    cfg.rope_theta, device=device)
        self._block_starts = frozenset(cfg.block_starts()) if cfg.attn_res else frozenset()
        self._block_reads = block_read_plan(sorted(self._block_starts), cfg.num_layers)
        self._build_techniques(device)
        self._regions = _Regions(layer_step, completed_sources_mix, KotodamaLM.head)
        self.init_weights()

    def _build_techniques(self, device) -> None:
        """Technique modules exist only when switched on, so the default state dict is the published one."""
        cfg, tech, d = self.cfg, self.cfg.techniques, self.cfg.hidden_size
        make_linear = lambda i, o: _linear(i, o, device)  # noqa: E731
        make_embedding = lambda n, w: _embedding(n, w, device)  # noqa: E731
        if tech.bigram_hash.buckets:
            self.bigram_hash = BigramHashEmbedding(tech.bigram_hash.buckets, tech.bigram_hash.dim, d,
                                                   make_linear, make_embedding, device=device)
        ve = tech.value_embed
        self._value_embed_into_values = ve.target == "values"
        if ve.layers:
            width = cfg.num_kv_heads * cfg.head_dim if ve.target == "values" else d
            self.value_embed = ValueEmbeddings(ve.layers, ve.num_tables, cfg.vocab_size, width,
                                               make_embedding, device=device)
        if tech.bigram_logits.enabled:
            self.bigram_logits = BigramLogitHead(cfg.vocab_size, tech.bigram_logits.rank, device=device)
        if tech.recurrence.enabled:
            self.recurrence = DepthRecurrence(tech.recurrence, d, device=device)
        if tech.unet_skips:
            self.unet = UNetSkips(cfg.num_layers, device=device)
        self._plan = [(i, -1, -1) for i in range(cfg.num_layers)]

    # ---------------------------------------------------------------- training progress
    def set_training_progress(self, fraction: float) -> None:
        """Called by the engine every step with step / total_steps; sets the recurrence repeat count
        (a no-op without recurrence). Under torch.compile a new count recompiles once per phase.
        A freshly built model runs at fraction 1.0 (its final depth), which evaluation wants."""
        if hasattr(self, "recurrence"):
            self.recurrence.set_repeats(repeats_at(self.cfg.techniques.recurrence, fraction))

    def effective_depth(self) -> int:
        """Layer applications per forward pass: num_layers + (R − 1)·span under recurrence."""
        if hasattr(self, "recurrence"):
            return self.cfg.num_layers + (self.recurrence.repeats - 1) * self.recurrence.span
        return self.cfg.num_layers

    def has_conditionally_unused_parameters(self) -> bool:
        """True when some parameters get no gradient in some steps (recurrence before switch-on, loop
        embeddings of repeats not yet reached): DDP then needs find_unused_parameters=True."""
        return hasattr(self, "recurrence")

    # ---------------------------------------------------------------- parameters
    @property
    def head_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def num_attn_res_parameters(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if _is_attn_res(name))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) for embeddings and matrices, o_proj/down_proj scaled by 1/sqrt(2·num_layers),
        norm gains 1, AttnRes queries 0. Draws come from a CPU generator (the global one by default) in
        parameter order, so the result is the same on every device and for every parameter dtype.

        Techniques: init "orthogonal" makes the layer matrices semi-orthogonal (techniques/init.py);
        bigram-hash and value-embedding tables and the hash projection N(0, init_std), their scales
        their scale_init; the bigram logit table (or its left factor) 0 and its right factor
        N(0, init_std); loop embeddings and cross-repeat skip scales 0; U-Net skip scales 1."""
        tech = self.cfg.techniques
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        ortho = tech.init == "orthogonal"
        for name, p in self.named_parameters():
            if _is_attn_res(name) and name.endswith("res_query"):
                p.zero_()
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.startswith("bigram_logits."):
                if name.endswith("right"):
                    _normal_(p, std, generator)
                else:
                    p.zero_()
            elif name in ("bigram_hash.scale",):
                p.fill_(tech.bigram_hash.scale_init)
            elif name.startswith("value_embed.scales."):
                p.fill_(tech.value_embed.scale_init)
            elif name.startswith(("bigram_hash.", "value_embed.tables.")):
                _normal_(p, std, generator)
            elif name.startswith("recurrence."):
                p.zero_()
            elif name == "unet.scales":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                if ortho:
                    orthogonal_(p, output_projection_gain(self.cfg.num_layers), generator)
                else:
                    _normal_(p, out_std, generator)
            elif name.endswith("proj.weight"):
                if ortho:
                    orthogonal_(p, 1.0, generator)
                else:
                    _normal_(p, std, generator)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                _normal_(p, std, generator)
            else:
                raise RuntimeError(f"init_weights does not know parameter {name!r}")
        self.rope.reset_buffers()

    def reset_parameters(self) -> None:
        self.init_weights()

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, targets: Tensor | None = None):
        """input_ids (B, T) -> logits (B, T, V); with targets -> (loss, {"ce", "z_loss"}) (chunked)."""
        hidden = self._backbone(input_ids)
        return self._regions.head(self, hidden, input_ids, targets)

    def head(self, hidden: Tensor, input_ids: Tensor, targets: Tensor | None = None):
        """Final normed states -> logits (with the bigram rows and the softcap when on), or the loss."""
        cap = self.cfg.techniques.logit_softcap
        bias = self.bigram_logits.weights() if hasattr(self, "bigram_logits") else ()
        if targets is None:
            logits = F.linear(hidden, self.head_weight)
            if bias:
                logits = logits + bigram_bias(input_ids, *bias).to(logits.dtype)
            return softcap(logits, cap) if cap > 0 else logits
        if cap <= 0 and not bias:
            return chunked_lm_loss(hidden, self.head_weight, targets, self.cfg.z_loss_weight,
                                   self.loss_chunk_tokens)
        return chunked_lm_loss(hidden, self.head_weight, targets, self.cfg.z_loss_weight,
                               self.loss_chunk_tokens, softcap=cap,
                               bias_ids=input_ids if bias else None, bias_weights=bias)

    @torch.no_grad()
    def trace(self, input_ids: Tensor, layers: list[int]) -> dict:
        """Internals of one forward pass at the given layers (no grad); see the module docstring.

        hidden[i]      (B, T, D) input of layer i's attention sublayer (AttnRes read or residual stream)
        layer_out[i]   (B, T, D) open block sum (or residual stream) after layer i
        attn_probs[i]  (B, H, T, T) causal softmax attention probabilities
        mlp_act[i]     (B, T, intermediate) silu(gate)·up (leaky_relu(up, 0.5)² with mlp "leaky_relu2")
        attn_res_weights[i] {"attn": (B, T, S), "mlp": (B, T, S)} mixture weights (attn_res only)
        final          (B, T, D) normed final hidden state
        Under recurrence a repeated layer is recorded at its last application.
        """
        bad = [i for i in layers if not 0 <= i < self.cfg.num_layers]
        if bad:
            raise ValueError(f"trace layers {bad} out of range [0, {self.cfg.num_layers - 1}]")
        rec: dict = {"layers": frozenset(layers), "hidden": {}, "layer_out": {}, "attn_probs": {},
                     "mlp_act": {}}
        if self.cfg.attn_res:
            rec["attn_res_weights"] = {i: {} for i in layers}
        rec["final"] = self._backbone(input_ids, rec)
        del rec["layers"]
        return rec

    def _read_params(self, key: tuple[str, int]) -> tuple[Tensor, RMSNorm]:
        kind, i = key
        if kind == "final":
            return self.final_res_query, self.final_res_norm
        layer = self.layers[i]
        if kind == "attn":
            return layer.attn_res_query, layer.attn_res_norm
        return layer.mlp_res_query, layer.mlp_res_norm

    def _open_block(self, done: list[Tensor], start: int) -> BlockReads:
        """Phase 1 of the block opening at layer `start`: all its reads against the completed sources."""
        keys = self._block_reads[start]
        return open_block(done, keys, [self._read_params(k) for k in keys], self.attn_res_runtime,
                          self._regions.phase_one)

    def _read_spec(self, block: BlockReads | None, done: list[Tensor], key: tuple[str, int], opens_block: bool,
                   two_phase: bool) -> ReadSpec:
        if not self.cfg.attn_res:
            return ReadSpec("plain")
        query, norm = self._read_params(key)
        return read_spec(block, done, key, query, norm, opens_block, two_phase, self.attn_res_runtime)

    def compile_regions(self, **compile_kwargs) -> None:
        """torch.compile the repeated regions instead of the whole model: the layer step (one graph for
        every layer of the same kind), phase 1 of the reads when it runs in PyTorch, and the head with
        its loss. The Python between them (block bookkeeping, embedding) stays eager. Compiling takes
        a few graphs instead of one graph of every layer unrolled."""
        # Unbound functions only: a deep copy of the model (the averaged weights' evaluation) must not
        # call back into this instance.
        self._regions = _Regions(torch.compile(layer_step, **compile_kwargs),
                                 torch.compile(completed_sources_mix, **compile_kwargs),
                                 torch.compile(KotodamaLM.head, **compile_kwargs))

    def _backbone(self, input_ids: Tensor, rec: dict | None = None) -> Tensor:
        """Embedding -> layers -> final read -> norm; returns the normed final hidden (B, T, D)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        cos, sin = self.rope(input_ids.shape[1])
        emb = self.embed_tokens(input_ids)
        if hasattr(self, "bigram_hash"):
            emb = emb + self.bigram_hash(input_ids).to(emb.dtype)
        attn_res = self.cfg.attn_res
        recurrence = getattr(self, "recurrence", None)
        unet = getattr(self, "unet", None)
        value_embed = getattr(self, "value_embed", None)
        ve_values = value_embed is not None and self._value_embed_into_values
        ve_residual = value_embed is not None and not self._value_embed_into_values
        plan = recurrence.plan(self.cfg.num_layers) if recurrence is not None else self._plan
        two_phase = attn_res and rec is None and self.attn_res_runtime.two_phase
        step = self._regions.layer_step if rec is None else layer_step
        block = None  # two-phase state of the open block
        done: list[Tensor] = []
        stream = OpenSum(emb)
        previous: dict[int, Tensor] = {}   # recurrence: stream after each loop slot, last repeat
        skips: dict[int, Tensor] = {}      # U-Net: stream after each encoder layer
        for i, repeat, slot in plan:
            layer = self.layers[i]
            r = rec if rec is not None and i in rec["layers"] else None
            if attn_res and i in self._block_starts:
                done.append(stream.total(emb.dtype))
                stream = OpenSum(None)
                if two_phase:
                    block = self._open_block(done, i)
            if not attn_res:
                x = stream.partial
                if repeat >= 0:
                    x = recurrence.enter(x, repeat, slot, previous)
                if unet is not None and i in unet.pairs:
                    k = unet.pairs[i]
                    x = x + unet.scales[k] * skips[k]
                if ve_residual:
                    extra = value_embed.term(i, input_ids)
                    if extra is not None:
                        x = x + extra.to(x.dtype)
                stream = OpenSum(x)
            v_extra = value_embed.term(i, input_ids) if ve_values else None
            attn_read = self._read_spec(block, done, ("attn", i), stream.partial is None, two_phase)
            mlp_read = self._read_spec(block, done, ("mlp", i), False, two_phase)
            stream = step(layer, stream, cos, sin, v_extra, attn_read, mlp_read, emb.dtype, r, i)
            if r is not None:
                r["layer_out"][i] = stream.partial
            if repeat >= 0:
                previous[slot] = stream.partial
            if unet is not None and i in unet.encoders:
                skips[i] = stream.partial
        final = self._read_spec(block, done, ("final", -1), False, two_phase)
        return read_norm(final, stream, self.norm, 1.0, emb.dtype, rec)[1]


def _ffn(layer: Layer, n: Tensor, rec: dict | None, i: int) -> Tensor:
    """The MLP sublayer on its normed input n."""
    if rec is None:
        return layer.ffn(n)
    m, rec["mlp_act"][i] = layer.ffn(n, return_act=True)
    return m


def layer_step(layer: Layer, stream: OpenSum, cos: Tensor, sin: Tensor, v_extra: Tensor | None,
               attn_read: ReadSpec, mlp_read: ReadSpec, stream_dtype: torch.dtype, rec: dict | None = None,
               index: int = -1) -> OpenSum:
    """One layer on the open-block sum (or residual stream): attention read, attention sublayer, MLP read,
    MLP sublayer. Returns the stream after the layer; its MLP output stays `pending` when the next read
    is a fused kernel that adds it (attnres.read_norm), and is added here otherwise. The unit that
    KotodamaLM.compile_regions compiles once for every layer. With `rec` (trace), the layer's internals
    are recorded under `index`."""
    if layer.parallel:  # GPT-J: attention and MLP read the same input h (plain stream only)
        h = apply_read(attn_read, stream.partial, stream_dtype, rec)
        if rec is not None:
            rec["hidden"][index] = h
        a = _attention(layer, _scaled(layer.attn_norm(h), layer.norm_scale), cos, sin, v_extra, rec, index)
        return OpenSum(stream.partial + a + _ffn(layer, _scaled(layer.ffn_norm(h), layer.norm_scale), rec, index))
    stream, n = read_norm(attn_read, stream, layer.attn_norm, layer.norm_scale, stream_dtype, rec, index)
    a = _attention(layer, n, cos, sin, v_extra, rec, index)
    stream, n = read_norm(mlp_read, OpenSum(stream.partial, a), layer.ffn_norm, layer.norm_scale, stream_dtype,
                          rec)
    m = _ffn(layer, n, rec, index)
    if mlp_read.kernels and rec is None:
        return OpenSum(stream.partial, m)
    return OpenSum(stream.partial + m)


def _scaled(n: Tensor, scale: float) -> Tensor:
    return n * scale if scale != 1.0 else n


def _attention(layer: Layer, n: Tensor, cos: Tensor, sin: Tensor, v_extra: Tensor | None, rec: dict | None,
               index: int) -> Tensor:
    if rec is None:
        return layer.attn(n, cos, sin, v_extra=v_extra)
    a, rec["attn_probs"][index] = layer.attn(n, cos, sin, return_probs=True, v_extra=v_extra)
    return a


# A third scope, the whole forward with each sublayer a torch.compiler.nested_compile_region, was
# measured and dropped: on CUDA with the AttnRes kernels it gave wrong gradients (bench/RESULTS.md).
COMPILE_SCOPES = ("model", "layers")


def compile_forward(model: KotodamaLM, scope: str, wrapped: nn.Module | None = None, **compile_kwargs) -> Callable:
    """The callable that runs `model`'s forward compiled at `scope` (train.compile_scope):
    model   torch.compile of the whole forward: one graph with every layer unrolled;
    layers  the repeated regions compiled separately (compile_regions), eager code between them.
    `wrapped` is what the forward runs through (the DDP wrapper of `model`), `model` itself if None."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    wrapped = model if wrapped is None else wrapped
    if scope == "layers":
        model.compile_regions(**compile_kwargs)
        return wrapped
    return torch.compile(wrapped, **compile_kwargs)


class _Regions(NamedTuple):
    """The functions the forward pass calls for its repeated parts: plain, or compiled ones."""

    layer_step: Callable
    phase_one: Callable
    head: Callable


def _is_attn_res(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("attn_res_query", "mlp_res_query", "final_res_query") or any(
        part in ("attn_res_norm", "mlp_res_norm", "final_res_norm") for part in name.split("."))


@torch.no_grad()
def _normal_(p: Tensor, std: float, generator: torch.Generator | None) -> None:
    if p.device.type == "meta":
        return
    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
