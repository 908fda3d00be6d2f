"""Base class for every config section (strict: unknown key = error; immutable) and the config error."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kotodama_core.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file, override or value is wrong; the message names the key and the file."""


class StrictModel(BaseModel):
    """A config section. Unknown keys are errors, never warnings."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def require_positive(section: BaseModel, prefix: str, names: tuple[str, ...]) -> None:
    """Raise ValueError naming the first of `names` whose value is not > 0 (`prefix.name`)."""
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ValueError(f"{prefix}{name} must be positive, got {value}")
