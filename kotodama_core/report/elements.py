"""The pieces every report page is built of: inline CSS, escaping, numbers, tables, panels, the page frame."""

from __future__ import annotations

import html
import math
from typing import Any, Callable

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1150px;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:2px;margin-top:1.2em}h3{margin:.8em 0 .3em}
.sub{color:#555;margin:0 0 .6em}nav{font-size:.9em;margin-bottom:.8em}nav a{margin-right:.9em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,.l{text-align:left}.note{background:#fff4d6;
border-left:4px solid #e0a000;padding:4px 8px;margin:4px 0}.diff{background:#ffe0e0;font-weight:bold}
.pm{color:#666;font-size:.9em}code{font-size:.9em}img{max-width:100%}section{margin-bottom:1em}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:6px 14px;align-items:start}
table.facts td:first-child{color:#555}img.tall{max-height:640px;width:auto}"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def note(text: str) -> str:
    return f'<div class="note">⚠ {esc(text)}</div>'


def num(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return '<span class="note">n/a</span>'
    return f"{v:.{digits}f}"


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells are HTML; the first `left` columns are left-aligned (text), the others right-aligned (numbers)."""
    def cls(i: int) -> str:
        return ' class="l"' if 0 < i < left else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def facts(rows: list[tuple[str, str]]) -> str:
    """A two-column label / value table without a header (values are HTML)."""
    body = "".join(f'<tr><td>{esc(k)}</td><td class="l">{v}</td></tr>' for k, v in rows)
    return f'<table class="facts">{body}</table>'


def img(uri: str | None, what: str, cls: str = "") -> str:
    klass = f' class="{esc(cls)}"' if cls else ""
    return f'<img alt="{esc(what)}"{klass} src="{uri}">' if uri else note(f"{what}: no data to plot")


def link(url: str | None, text: str) -> str:
    return f'<a href="{esc(url)}">{esc(text)}</a>' if url else esc(text)


def safe(build: Callable[[], str]) -> str:
    """Build one part of a page; a failure inside it becomes a visible note instead of a crashed page."""
    try:
        return build()
    except Exception as exc:  # one bad panel must not take the report down
        return note(f"could not build this panel: {type(exc).__name__}: {exc}")


def panel(title: str, build: Callable[[], str], anchor: str | None = None, level: int = 2) -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h{level}>{esc(title)}</h{level}>{safe(build)}</section>"


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """`sections`: (anchor, nav label, html) in page order; the nav bar links each."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(label)}</a>' for a, label, _ in sections)
    body = "".join(h for _, _, h in sections)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p class=sub>{subtitle}</p>"
            f"<nav>{nav}</nav>{body}</body></html>")
