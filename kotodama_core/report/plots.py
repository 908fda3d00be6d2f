"""Matplotlib figures as base64 PNG data URIs; a figure with nothing to draw returns None."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
