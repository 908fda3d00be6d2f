"""Training curves from the engine's metrics.jsonl rows, on a tokens axis (steps can be read off a second axis).

The engine writes one row per logged step (`step`, `loss`, `lr_muon`, `lr_adamw`, `lr_mult`, `grad_norm`,
`tokens_seen`, `tokens_per_s`, `mfu` when the device's peak is known) and one row `{step, val_loss}` per
validation; the training manifest holds the validation loss after the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kotodama_core.eval.results import finite

# (metric key, legend label); the first keys a run has are drawn. `lr` is accepted for logs that carry a
# single learning rate; the engine writes one per optimizer group.
LR_KEYS = (("lr_muon", "Muon lr"), ("lr_adamw", "AdamW lr"), ("lr", "lr"))


@dataclass
class Curve:
    label: str
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    points: bool = False          # markers only (sparse values such as validation losses)
    color: str | None = None      # one colour per run on comparison charts
    linestyle: str = "-"


@dataclass
class Curves:
    """What the headline charts draw; `x_is_tokens` False means the x values are steps."""

    loss: list[Curve]
    lr: list[Curve]
    lr_is_multiplier: bool
    grad_norm: list[Curve]
    tokens_per_s: list[Curve]
    x_is_tokens: bool
    tokens_per_step: float | None


def tokens_per_step(rows: list[dict[str, Any]], global_batch_tokens: int | None = None) -> float | None:
    """Tokens one optimizer step adds: the median of tokens_seen / (step + 1) over the rows that log
    `tokens_seen` (the engine writes it after step `step`, counting from step 0), else the config's
    train.global_batch_tokens, else None."""
    ratios = sorted(t / (s + 1) for s, t in ((r.get("step"), finite(r.get("tokens_seen"))) for r in rows)
                    if isinstance(s, int) and s >= 0 and t is not None)
    if ratios:
        return ratios[len(ratios) // 2]
    return float(global_batch_tokens) if global_batch_tokens else None


def _x(row: dict[str, Any], per_step: float | None) -> float | None:
    step = row.get("step")
    if not isinstance(step, (int, float)) or isinstance(step, bool):
        return None
    if per_step is None:
        return float(step)
    seen = finite(row.get("tokens_seen"))
    return seen if seen is not None else (step + 1) * per_step


def _curve(rows: list[dict[str, Any]], key: str, label: str, per_step: float | None, points: bool = False) -> Curve:
    curve = Curve(label, points=points)
    for r in rows:
        x, y = _x(r, per_step), finite(r.get(key))
        if x is not None and y is not None:
            curve.xs.append(x)
            curve.ys.append(y)
    return curve


def training_curves(rows: list[dict[str, Any]], global_batch_tokens: float | None = None,
                    final_val_loss: float | None = None, final_tokens: float | None = None,
                    on_tokens: bool = True) -> Curves:
    """Train and validation loss, learning rates, gradient norm and throughput of one run; the x values are
    tokens when they can be known (and `on_tokens`), else steps."""
    per_step = tokens_per_step(rows, global_batch_tokens) if on_tokens else None
    val = _curve(rows, "val_loss", "val loss", per_step, points=True)
    if final_val_loss is not None:
        end = final_tokens if per_step is not None else None
        if end is None:  # the last logged step stands for the end of training
            train_xs = [x for x in (_x(r, per_step) for r in rows if "loss" in r) if x is not None]
            end = train_xs[-1] if train_xs else None
        if end is not None:
            val.xs.append(float(end))
            val.ys.append(final_val_loss)
    lrs = [c for c in (_curve(rows, k, label, per_step) for k, label in LR_KEYS) if c.xs]
    for c, style in zip(lrs, ("-", "--", ":")):
        c.linestyle = style
    multiplier = not lrs
    if multiplier:
        lrs = [_curve(rows, "lr_mult", "lr multiplier", per_step)]
    return Curves(loss=[_curve(rows, "loss", "train loss", per_step), val], lr=lrs, lr_is_multiplier=multiplier,
                  grad_norm=[_curve(rows, "grad_norm", "grad norm (before clipping)", per_step)],
                  tokens_per_s=[_curve(rows, "tokens_per_s", "tokens/s", per_step)],
                  x_is_tokens=per_step is not None, tokens_per_step=per_step)
