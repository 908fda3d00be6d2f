"""Matplotlib figures as base64 PNG data URIs; a figure with nothing to draw returns None."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401 - FuncFormatter for token counts


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        x, y = r.get("step"), r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y == y:
            xs.append(x)
            ys.append(y)
    return xs, ys


def moving_average(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def line_plot(runs: dict[str, list[dict[str, Any]]], key: str, title: str, ylabel: str,
              smoothing: int = 1) -> str | None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for name, rows in runs.items():
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, moving_average(ys, smoothing), label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend()
    return to_data_uri(fig)


def profile_plot(profiles: dict[str, dict[int, float | None]], title: str, ylabel: str) -> str | None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for label, prof in profiles.items():
        pts = [(k, v) for k, v in prof.items() if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="layer", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def curve_plot(curves, title: str, ylabel: str, *, x_is_tokens: bool, tokens_per_step: float | None = None,
               logy: bool = False, smoothing: int = 1) -> str | None:
    """Lines (or markers, for sparse curves) against tokens; with `tokens_per_step`, a second x axis on top
    reads the step: step = tokens / tokens_per_step - 1 (the engine logs tokens seen after that step)."""
    fig, ax = plt.subplots(figsize=(5.4, 3.0))
    drawn = 0
    for c in curves:
        if not c.xs:
            continue
        if c.points:
            ax.plot(c.xs, c.ys, "o", ms=5, label=c.label, color=c.color)
        else:
            ax.plot(c.xs, moving_average(c.ys, smoothing), c.linestyle, label=c.label, color=c.color)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="tokens" if x_is_tokens else "step", ylabel=ylabel)
    if logy:
        ax.set_yscale("log", nonpositive="mask")  # a schedule that decays to 0 ends off the log axis
    if x_is_tokens:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_short_count))
        if tokens_per_step:
            top = ax.secondary_xaxis("top", functions=(lambda t: t / tokens_per_step - 1,
                                                       lambda s: (s + 1) * tokens_per_step))
            top.set_xlabel("step", fontsize=8)
            top.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if drawn > 1:
        ax.legend(fontsize=8)
    return to_data_uri(fig)


def _short_count(x: float, _pos: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"
