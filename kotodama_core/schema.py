"""Base class for every config section: strict (unknown key = error) and immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section. Unknown keys are errors, never warnings."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
