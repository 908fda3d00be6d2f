"""TechniquesConfig: the optional architecture techniques of KotodamaLM, every one off by default.

With every field at its default the model is the published Kotodama architecture, parameter for
parameter. Each field names one technique; `active()` lists the ones switched on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from kotodama_core.schema import StrictModel


class BigramLogitsConfig(StrictModel):
    """Count-initialized bigram logit head: logits[t] += B[input_ids[t]] (see techniques/bigram_logits.py).

    rank 0 keeps the exact V×V table (vocab_size ≤ 8192); rank r > 0 keeps B ≈ L·Rᵀ with L, R (V, r),
    initialized by a truncated SVD of the count table over the `support_tokens` most frequent ids
    (0 = every id; needed for large vocabularies, whose V×V table does not fit in memory).
    """

    enabled: bool = False
    rank: int = 0
    support_tokens: int = 0
    smoothing: float = 0.25
    clip: float = 4.0

    @model_validator(mode="after")
    def _check(self) -> "BigramLogitsConfig":
        if self.rank < 0 or self.support_tokens < 0:
            raise ValueError("bigram_logits.rank and bigram_logits.support_tokens must be >= 0")
        if self.smoothing <= 0:
            raise ValueError(f"bigram_logits.smoothing must be positive, got {self.smoothing}")
        if self.clip <= 0:
            raise ValueError(f"bigram_logits.clip must be positive, got {self.clip}")
        return self


class BigramHashConfig(StrictModel):
    """Hashed (previous, current) token-pair embedding added to the token embedding; buckets 0 = off."""

    buckets: int = 0
    dim: int = 128
    scale_init: float = 0.05

    @model_validator(mode="after")
    def _check(self) -> "BigramHashConfig":
        if self.buckets != 0 and self.buckets < 2:
            raise ValueError(f"bigram_hash.buckets must be 0 (off) or >= 2, got {self.buckets}")
        if self.dim <= 0:
            raise ValueError(f"bigram_hash.dim must be positive, got {self.dim}")
        return self


class ValueEmbedConfig(StrictModel):
    """Extra token-embedding tables added, with a learned scalar per layer, at `layers`.

    target "values": into the attention values (table width num_kv_heads·head_dim);
    target "residual": into the residual stream before the layer (table width hidden_size).
    Layer k of the list uses table k mod num_tables.
    """

    layers: list[int] = []
    target: Literal["values", "residual"] = "values"
    num_tables: int = 1
    scale_init: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> "ValueEmbedConfig":
        if self.num_tables < 1:
            raise ValueError(f"value_embed.num_tables must be >= 1, got {self.num_tables}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"value_embed.layers has duplicates: {self.layers}")
        return self


class RecurrenceConfig(StrictModel):
    """Layers start_layer..end_layer (inclusive) applied `repeats[k]` times from training fraction
    `at_fractions[k]` on (1 time before the first fraction). Off while `repeats` is empty."""

    start_layer: int = 0
    end_layer: int = 0
    repeats: list[int] = []
    at_fractions: list[float] = []
    cross_repeat_skip: bool = True
    loop_embed: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.repeats)

    @model_validator(mode="after")
    def _check(self) -> "RecurrenceConfig":
        if len(self.repeats) != len(self.at_fractions):
            raise ValueError(f"recurrence.repeats {self.repeats} and recurrence.at_fractions "
                             f"{self.at_fractions} must have the same length")
        if any(r < 2 for r in self.repeats):
            raise ValueError(f"recurrence.repeats must each be >= 2, got {self.repeats}")
        f = self.at_fractions
        if any(not 0.0 <= x < 1.0 for x in f) or any(a >= b for a, b in zip(f, f[1:])):
            raise ValueError(f"recurrence.at_fractions must be strictly increasing in [0, 1), got {f}")
        if self.enabled and not 0 <= self.start_layer <= self.end_layer:
            raise ValueError(f"recurrence needs 0 <= start_layer <= end_layer, got "
                             f"{self.start_layer}..{self.end_layer}")
        return self


class TechniquesConfig(StrictModel):
    """Optional techniques (the parameter-golf records' toolbox); defaults = off."""

    xsa_last_n: int = 0                          # exclusive self attention on the last N layers
    rotary_dims: int = 0                         # partial RoPE on the first k head dims; 0 = all
    logit_softcap: float = 0.0                   # logits <- c·tanh(logits / c); 0 = off
    bigram_logits: BigramLogitsConfig = BigramLogitsConfig()
    bigram_hash: BigramHashConfig = BigramHashConfig()
    value_embed: ValueEmbedConfig = ValueEmbedConfig()
    ln_scale: bool = False                       # sublayer norm output × 1/sqrt(layer + 1)
    recurrence: RecurrenceConfig = RecurrenceConfig()
    parallel_residual_start: int | None = None   # GPT-J parallel attn + MLP from this layer on
    mlp: Literal["swiglu", "leaky_relu2"] = "swiglu"
    init: Literal["normal", "orthogonal"] = "normal"
    unet_skips: bool = False

    def active(self) -> list[str]:
        """Names of the techniques switched on (empty = the published architecture)."""
        on = {
            "xsa": self.xsa_last_n > 0, "partial_rope": self.rotary_dims > 0,
            "logit_softcap": self.logit_softcap > 0, "bigram_logits": self.bigram_logits.enabled,
            "bigram_hash": self.bigram_hash.buckets > 0, "value_embed": bool(self.value_embed.layers),
            "ln_scale": self.ln_scale, "recurrence": self.recurrence.enabled,
            "parallel_residual": self.parallel_residual_start is not None,
            "leaky_relu2_mlp": self.mlp != "swiglu", "orthogonal_init": self.init != "normal",
            "unet_skips": self.unet_skips}
        return [name for name, flag in on.items() if flag]

    @model_validator(mode="after")
    def _check(self) -> "TechniquesConfig":
        if self.xsa_last_n < 0:
            raise ValueError(f"techniques.xsa_last_n must be >= 0, got {self.xsa_last_n}")
        if self.rotary_dims < 0 or self.rotary_dims % 2:
            raise ValueError(f"techniques.rotary_dims must be even and >= 0, got {self.rotary_dims}")
        if self.logit_softcap < 0:
            raise ValueError(f"techniques.logit_softcap must be >= 0, got {self.logit_softcap}")
        return self

    def check_against(self, num_layers: int, head_dim: int, vocab_size: int, attn_res: bool) -> None:
        """Checks that need the model shape (called by KotodamaConfig)."""
        if self.xsa_last_n > num_layers:
            raise ValueError(f"techniques.xsa_last_n ({self.xsa_last_n}) exceeds num_layers ({num_layers})")
        if self.rotary_dims > head_dim:
            raise ValueError(f"techniques.rotary_dims ({self.rotary_dims}) exceeds head_dim ({head_dim})")
        bad = [i for i in self.value_embed.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"techniques.value_embed.layers {bad} out of range [0, {num_layers - 1}]")
        rec = self.recurrence
        if rec.enabled and rec.end_layer >= num_layers:
            raise ValueError(f"techniques.recurrence.end_layer ({rec.end_layer}) must be < num_layers "
                             f"({num_layers})")
        p = self.parallel_residual_start
        if p is not None and not 0 <= p < num_layers:
            raise ValueError(f"techniques.parallel_residual_start ({p}) out of range [0, {num_layers - 1}]")
        bl = self.bigram_logits
        if bl.enabled and bl.rank == 0 and vocab_size > 8192:
            raise ValueError(f"techniques.bigram_logits: an exact {vocab_size}×{vocab_size} table is too "
                             "large; set bigram_logits.rank (low-rank table) and support_tokens")
        if bl.support_tokens > vocab_size:
            raise ValueError(f"techniques.bigram_logits.support_tokens ({bl.support_tokens}) exceeds "
                             f"vocab_size ({vocab_size})")
        if bl.enabled and bl.rank == 0 and bl.support_tokens:
            raise ValueError("techniques.bigram_logits.support_tokens applies to the low-rank table only "
                             "(set rank > 0, or support_tokens 0)")
        if attn_res:
            # AttnRes replaces the residual stream by depth mixtures over block sums; these techniques
            # each rewrite that stream and have no single meaning inside a block sum.
            clash = [name for name, on in (
                ("recurrence", rec.enabled), ("unet_skips", self.unet_skips),
                ("parallel_residual_start", p is not None),
                ("value_embed.target=residual", bool(self.value_embed.layers)
                 and self.value_embed.target == "residual")) if on]
            if clash:
                raise ValueError(f"techniques {clash} rewrite the plain residual stream and cannot be "
                                 "combined with attn_res: set attn_res false")
        if rec.enabled and self.unet_skips:
            raise ValueError("techniques.unet_skips with recurrence is undefined (the encoder/decoder "
                             "mirror changes with the repeat count); switch one off")
