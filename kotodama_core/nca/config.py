"""NCA config section (the NCA helper owns and extends this)."""

from __future__ import annotations

from kotodama_core.schema import StrictModel


class NCAConfig(StrictModel):
    grid: int = 32
    states: int = 10
    channels: int = 4
    patch: int = 2
    steps: int = 128
    burn_in: int = 10
    seed: int = 17
