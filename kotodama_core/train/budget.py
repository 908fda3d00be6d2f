"""The token budget of a training run: how many passes over its training data it will make.

    training tokens  T = Σ over train shards of rows × (window − 1)   (the predicted tokens a window holds)
    tokens to be seen S = steps × global_batch_tokens
    epochs            E = S / T

A run above `train.max_epochs` is refused before it starts, so a short data mix never turns into
silent repetition (a 160-step proxy run on a 151K-token mix made ~140 passes and overfit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kotodama_core.errors import UserError


class BudgetError(UserError, RuntimeError):
    """The run would repeat its training data more often than train.max_epochs allows."""


@dataclass(frozen=True)
class TokenBudget:
    training_tokens: int   # T
    tokens_to_see: int     # S
    max_epochs: float | None

    @property
    def epochs(self) -> float:
        """E = S / T (inf when the data holds no training tokens)."""
        return self.tokens_to_see / self.training_tokens if self.training_tokens else float("inf")

    def line(self) -> str:
        return (f"[train] token budget: {self.training_tokens:,} training tokens available, "
                f"{self.tokens_to_see:,} to be seen, {self.epochs:.3f} epochs"
                + (f" (train.max_epochs {self.max_epochs:g})" if self.max_epochs is not None else ""))


def training_tokens(manifest: Mapping[str, Any]) -> int:
    """T from a data manifest: Σ rows × (window − 1) over its train shards."""
    window = int(manifest.get("window", 0))
    shards = (manifest.get("splits") or {}).get("train") or []
    return sum(int(s["rows"]) for s in shards) * max(window - 1, 0)


def token_budget(manifest: Mapping[str, Any], steps: int, global_batch_tokens: int,
                 max_epochs: float | None) -> TokenBudget:
    return TokenBudget(training_tokens(manifest), steps * global_batch_tokens, max_epochs)


def check_budget(budget: TokenBudget, data_path: str) -> None:
    """Refuse, in one line with the numbers, a run above train.max_epochs."""
    if budget.max_epochs is not None and budget.epochs > budget.max_epochs:
        raise BudgetError(
            f"train.steps × train.global_batch_tokens = {budget.tokens_to_see:,} tokens is {budget.epochs:.2f} "
            f"epochs of the {budget.training_tokens:,} training tokens in {data_path}, above train.max_epochs="
            f"{budget.max_epochs:g}: build more data (data.total_tokens), lower train.steps, or raise "
            "train.max_epochs to repeat the data on purpose")
