"""KotodamaConfig: the model shape, field names as in the published Kotodama 108M card.

`techniques` holds the optional techniques (techniques/config.py), all off by default. While the
section equals its default it is left out of the dump, so the resolved config, its digest and the published
config are exactly those of a build without the section.
"""

from __future__ import annotations

from pydantic import model_serializer, model_validator

from kotodama_core.model.techniques.config import TechniquesConfig
from kotodama_core.schema import StrictModel, require_positive


class KotodamaConfig(StrictModel):
    hidden_size: int = 512
    num_layers: int = 28
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 1408
    vocab_size: int = 49152
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    tie_word_embeddings: bool = True
    z_loss_weight: float = 1e-5
    attn_res: bool = True
    # Explicit block starts (0-based layer indices); None with attn_res_num_blocks gives uniform blocks.
    attn_res_boundaries: list[int] | None = None
    attn_res_num_blocks: int | None = None
    init_std: float = 0.02
    techniques: TechniquesConfig = TechniquesConfig()

    @model_serializer(mode="wrap")
    def _drop_default_techniques(self, handler):
        data = handler(self)
        if isinstance(data, dict) and self.techniques == TechniquesConfig():
            data.pop("techniques", None)
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> "KotodamaConfig":
        require_positive(self, "", ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                                    "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings"))
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.attn_res_boundaries is not None and self.attn_res_num_blocks is not None:
            raise ValueError("give either attn_res_boundaries or attn_res_num_blocks, not both")
        b = self.attn_res_boundaries
        if b is not None:
            if not b:
                raise ValueError("attn_res_boundaries is empty; give at least [0]")
            if any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"attn_res_boundaries must be strictly increasing, got {b}")
            if b[0] < 0 or b[-1] >= self.num_layers:
                raise ValueError(
                    f"attn_res_boundaries {b} out of range: each must lie in [0, {self.num_layers - 1}]")
        n = self.attn_res_num_blocks
        if n is not None and not 1 <= n <= self.num_layers:
            raise ValueError(f"attn_res_num_blocks must lie in [1, num_layers={self.num_layers}], got {n}")
        self.techniques.check_against(self.num_layers, self.head_dim, self.vocab_size, self.attn_res)
        return self

    def block_starts(self) -> list[int]:
        """0-based layers at which a new AttnRes block begins (its pre-attention read happens first)."""
        if self.attn_res_boundaries is not None:
            return list(self.attn_res_boundaries)
        n = self.attn_res_num_blocks or 1
        return sorted({i * self.num_layers // n for i in range(n)})
