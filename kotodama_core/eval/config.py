"""Eval and report config sections (the eval helper owns and extends these)."""

from __future__ import annotations

from kotodama_core.schema import StrictModel


class EvalConfig(StrictModel):
    tasks: list[str] = ["arc_easy", "boolq", "copa", "hellaswag", "lambada_openai", "piqa", "sciq",
                        "wikitext", "winogrande"]
    limit: int | None = None
    batch_size: int = 16


class ReportConfig(StrictModel):
    title: str = "Kotodama run report"
