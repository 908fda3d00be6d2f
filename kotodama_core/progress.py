"""Progress lines for long stages: one plain line at a steady cadence, a bar on an interactive terminal.

Every long stage (training, data, NCA search and data, eval) reports through `Progress`. A line reads

    [train] 120/1000 12.0% | loss 3.2104 | lr 3.00e-04 | tokens/s 41,200 | elapsed 1m02s | eta 9m10s

and `parse_progress_line` reads it back, so the Prefect flow (which streams a stage's stdout into its
logger) can follow the same numbers in a progress artifact without a second channel. On a terminal
(stdout is a TTY, `CI` unset) and with tqdm installed, a bar is drawn instead of the lines; the final
line is always printed plainly so that logs end with the totals.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Any, TextIO

_LINE = re.compile(r"^\[(?P<stage>[A-Za-z0-9_.:-]+)\] (?P<done>\d+)/(?P<total>\d+|\?)(?: [\d.]+%)?(?P<rest>.*)$")


def format_duration(seconds: float) -> str:
    """`75` -> `1m15s`, `3725` -> `1h02m`, `9` -> `9s`."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_value(value: Any) -> str:
    """Numbers printed for a person: integers with separators, small floats in scientific notation."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e6):
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def format_line(stage: str, done: int, total: int | None, fields: dict[str, Any]) -> str:
    head = f"[{stage}] {done}/{total if total else '?'}"
    if total:
        head += f" {100.0 * done / total:.1f}%"
    parts = [head] + [f"{k} {format_value(v)}" for k, v in fields.items() if v is not None]
    return " | ".join(parts)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The inverse of `format_line`: {"stage", "done", "total", "fields"} or None for any other line."""
    m = _LINE.match(line.strip())
    if not m:
        return None
    fields: dict[str, str] = {}
    for part in m.group("rest").split(" | ")[1:]:
        key, _, value = part.rpartition(" ")
        if key:
            fields[key] = value
    total = m.group("total")
    return {"stage": m.group("stage"), "done": int(m.group("done")),
            "total": None if total == "?" else int(total), "fields": fields}


def _want_bar(stream: TextIO) -> bool:
    if os.environ.get("CI") or os.environ.get("KOTODAMA_PLAIN_PROGRESS"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Reports `done` of `total` units of one stage, at most once per `every_s` seconds.

    `update(done, **fields)` prints when the cadence allows (always for the first and the last unit);
    elapsed time and an ETA (elapsed / done × remaining, from the first update on) are appended.
    """

    def __init__(self, stage: str, total: int | None, *, every_s: float = 10.0, stream: TextIO | None = None,
                 bar: bool | None = None, clock=time.monotonic):
        self.stage = stage
        self.total = total
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.clock = clock
        self.start = clock()
        self._last_print = -math.inf
        self._start_done: int | None = None
        self._start_time = self.start
        self._bar = None
        if bar if bar is not None else _want_bar(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=stage, file=self.stream, dynamic_ncols=True)
        self.done = 0

    def eta_s(self, done: int) -> float:
        """Remaining time = (now - t0) / (done - done0) × (total - done), from the first update on."""
        if not self.total or self._start_done is None or done <= self._start_done:
            return math.nan
        rate = (done - self._start_done) / max(self.clock() - self._start_time, 1e-9)
        return (self.total - done) / rate

    def line(self, done: int, fields: dict[str, Any]) -> str:
        timing = {"elapsed": format_duration(self.clock() - self.start)}
        if self.total and done < self.total:
            timing["eta"] = format_duration(self.eta_s(done))
        return format_line(self.stage, done, self.total, {**fields, **timing})

    def update(self, done: int, force: bool = False, **fields: Any) -> str | None:
        """Record progress; returns the printed line (None when the cadence skipped it)."""
        if self._start_done is None:
            self._start_done, self._start_time = done, self.clock()
        if self._bar is not None:
            self._bar.update(done - self.done)
            self._bar.set_postfix({k: format_value(v) for k, v in fields.items() if v is not None}, refresh=False)
        self.done = done
        now = self.clock()
        last = self.total is not None and done >= self.total
        if not (force or last or now - self._last_print >= self.every_s):
            return None
        self._last_print = now
        text = self.line(done, fields)
        if self._bar is None or last:
            print(text, file=self.stream, flush=True)
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
