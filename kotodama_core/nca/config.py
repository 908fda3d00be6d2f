"""NCA config section: the cellular world, the random rule space, the complexity search, trajectory
packing and the boundary-derivation probe.

Top-level fields describe the world every stage shares (grid, states, channels, patch, burn-in,
trajectory length); the nested sections belong to one stage each, so a stage's digest can cover only
the parts it reads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from kotodama_core.schema import StrictModel, require_positive


class RuleSpaceConfig(StrictModel):
    """Random transition networks; each rule draws its own shape and identity bias from these sets."""

    kernel_sizes: list[int] = [3, 5]
    hidden_widths: list[int] = [16, 32, 48]
    min_hidden_layers: int = 1
    max_hidden_layers: int = 3
    # The identity bias is added to the logit of each cell's current state; drawn uniformly per rule.
    identity_bias_min: float = 0.0
    identity_bias_max: float = 0.5
    temperature: float = 1e-4
    # When set, each rule draws its temperature uniformly from [temperature, temperature_max].
    temperature_max: float | None = None
    # he: N(0, 2/active fan-in) weights, no biases (this project's generator);
    # original: the original Kotodama code's NCARule._random_init (src/nca/generator.py:176-182),
    # weights N(0, 0.5²) and biases N(0, 0.1²) on every conv.
    init: Literal["he", "original"] = "he"

    @model_validator(mode="after")
    def _check(self) -> "RuleSpaceConfig":
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"nca.rule.kernel_sizes must be odd positive sizes, got {self.kernel_sizes}")
        if not self.hidden_widths or any(w < 1 for w in self.hidden_widths):
            raise ValueError(f"nca.rule.hidden_widths must be positive, got {self.hidden_widths}")
        if not 1 <= self.min_hidden_layers <= self.max_hidden_layers:
            raise ValueError(f"nca.rule needs 1 <= min_hidden_layers <= max_hidden_layers, got "
                             f"{self.min_hidden_layers}, {self.max_hidden_layers}")
        if self.identity_bias_min > self.identity_bias_max:
            raise ValueError(f"nca.rule.identity_bias_min ({self.identity_bias_min}) exceeds "
                             f"identity_bias_max ({self.identity_bias_max})")
        if self.temperature <= 0:
            raise ValueError(f"nca.rule.temperature must be positive, got {self.temperature}")
        if self.temperature_max is not None and self.temperature_max < self.temperature:
            raise ValueError(f"nca.rule.temperature_max ({self.temperature_max}) is below temperature "
                             f"({self.temperature})")
        return self


class SearchConfig(StrictModel):
    """Sample rules until `rules` of them score inside (band_low, band_high), or `max_tries` are spent."""

    rules: int = 1024
    max_tries: int = 16384
    band_low: float | None = 0.4
    band_high: float | None = 0.7
    # The score trajectory: `score_steps` frames after burn-in on `score_grids` random grids.
    score_steps: int = 30
    score_grids: int = 4
    # Bytes gzip sees: patch tokens written as little-endian uint16 (Kotodama) or int32 (the paper).
    score_dtype: Literal["uint16", "int32"] = "uint16"
    batch_rules: int = 256
    # zlib releases the GIL, so scoring threads run in parallel.
    score_workers: int = 4

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        if self.band_low is None and self.band_high is None:
            raise ValueError("nca.search needs band_low, band_high or both")
        if self.band_low is not None and self.band_high is not None and self.band_low >= self.band_high:
            raise ValueError(f"nca.search band is empty: band_low ({self.band_low}) >= band_high "
                             f"({self.band_high})")
        require_positive(self, "nca.search.", ("rules", "max_tries", "score_steps", "score_grids",
                                               "batch_rules", "score_workers"))
        if self.max_tries < self.rules:
            raise ValueError(f"nca.search.max_tries ({self.max_tries}) < rules ({self.rules})")
        return self


class TrajectoryDataConfig(StrictModel):
    """How the data stage turns the rule bank into packed token windows of seq_len + 1."""

    seq_len: int = 4096
    train_tokens: int = 1 << 24
    val_tokens: int = 1 << 20
    # The last `val_rules` rules of the bank are held out: val measures rule inference on unseen rules.
    val_rules: int = 16
    rules_per_batch: int = 64
    grids_per_batch: int = 1
    shard_windows: int = 4096

    @model_validator(mode="after")
    def _check(self) -> "TrajectoryDataConfig":
        require_positive(self, "nca.data.", ("seq_len", "train_tokens", "val_tokens", "val_rules",
                                             "rules_per_batch", "grids_per_batch", "shard_windows"))
        return self


class BoundaryConfig(StrictModel):
    """Probe an NCA checkpoint per layer and pick AttnRes block starts where the profile jumps."""

    max_boundaries: int = 6
    min_block: int = 2
    probe_batch: int = 8
    probe_seq_len: int = 1024
    probe_split: Literal["train", "val"] = "val"
    # A unit is dead when max |activation| over the probe batch is at most this.
    dead_threshold: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> "BoundaryConfig":
        require_positive(self, "nca.boundaries.", ("max_boundaries", "min_block", "probe_batch",
                                                   "probe_seq_len"))
        return self


class NCAConfig(StrictModel):
    seed: int = 17
    grid: int = 32
    states: int = 10
    channels: int = 4
    patch: int = 2
    burn_in: int = 10
    steps: int = 128
    rule: RuleSpaceConfig = RuleSpaceConfig()
    search: SearchConfig = SearchConfig()
    data: TrajectoryDataConfig = TrajectoryDataConfig()
    boundaries: BoundaryConfig = BoundaryConfig()

    @model_validator(mode="after")
    def _check(self) -> "NCAConfig":
        require_positive(self, "nca.", ("grid", "states", "channels", "patch", "steps"))
        if self.states < 2:
            raise ValueError(f"nca.states must be at least 2, got {self.states}")
        if self.burn_in < 0:
            raise ValueError(f"nca.burn_in must be >= 0, got {self.burn_in}")
        if self.grid % self.patch:
            raise ValueError(f"nca.grid ({self.grid}) is not divisible by nca.patch ({self.patch})")
        if self.vocab_size > 1 << 32:
            raise ValueError(f"nca vocabulary states**(patch**2) + 2 = {self.vocab_size} does not fit uint32")
        return self

    @property
    def vocab_size(self) -> int:
        """states**(patch*patch) patch tokens plus the frame START and END tokens."""
        return self.states ** (self.patch * self.patch) + 2
