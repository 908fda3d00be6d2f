"""Eval and report config sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from kotodama_core.eval.tasks import KNOWN_TASKS
from kotodama_core.schema import StrictModel

REPO_ROOT = Path(__file__).resolve().parents[2]


class ValBpbConfig(StrictModel):
    """Bits per byte on the data artifact's held-out `val/` split (needs the `data` input)."""

    enabled: bool = True
    max_windows: int | None = 64       # windows of the val split scored (None = all)
    context: int | None = None         # tokens of context per window (None = the model's max positions)
    # A local tokenizer.json or hub id, for the exact byte length of each token; None = the data
    # manifest's `bytes_per_token` average.
    tokenizer: str | None = "../shared/data/smollm2-tokenizer/tokenizer.json"


class EvalConfig(StrictModel):
    tasks: list[str] = list(KNOWN_TASKS)
    limit: int | None = None           # documents per task (None = all)
    batch_size: int = 16
    max_length: int | None = None      # context window for scoring (None = model max positions)
    stride: int = 64                   # sliding-window stride for rolling loglikelihood / perplexity
    # Folder with local task files (llm-foundry formats); relative paths resolve against the repo root.
    # A task whose file is absent there loads from the Hugging Face hub.
    data_dir: str | None = "../shared/data/eval"
    device: str = "auto"               # auto: cuda when available, else cpu
    dtype: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 1234
    temperature: float = 1.0           # generate_until: pure temperature sampling, no top-p / top-k
    max_gen_tokens: int = 256
    tokenizer: str = "../shared/data/smollm2-tokenizer/tokenizer.json"
    val_bpb: ValBpbConfig = ValBpbConfig()

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        unknown = [t for t in self.tasks if t not in KNOWN_TASKS]
        if unknown:
            raise ValueError(f"eval.tasks: unknown task(s) {unknown}; known: {list(KNOWN_TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit must be positive or null, got {self.limit}")
        if self.batch_size < 1 or self.stride < 1 or self.max_gen_tokens < 1:
            raise ValueError("eval.batch_size, eval.stride and eval.max_gen_tokens must be positive")
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        return self


def resolve_repo_path(path: str | None) -> Path | None:
    """Relative paths mean 'relative to the repository root' (so ../shared/... works from any cwd)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


class ReportConfig(StrictModel):
    title: str = "Kotodama run report"
    # Relative difference above which the comparison page highlights a value.
    highlight_rel_diff: float = 0.05
    smoothing: int = 1                 # moving-average window for the loss curve (1 = raw)
