"""HTML pages (no external resources: CSS inline, plots as data URIs), headline first.

Both pages have the same order: headline numbers and training curves, evaluation, configuration, NCA
pre-pretraining (when there is one), tracking links, then the geometry charts grouped by family, and last
the notes about missing or bad data.
"""

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


def run_page(s: dict[str, Any], report_title: str, smoothing: int = 1) -> str:
    from kotodama_core.report import sections as sec

    runs = [(s["name"], s)]
    cfg = s.get("config") or {}
    digest = cfg.get("train_digest") or s.get("train_digest")
    subtitle = " · ".join(x for x in (
        esc(report_title), f"run <code>{esc(s['name'])}</code>",
        f"training artifact <code>{esc(digest[:16])}</code>" if digest else "") if x)
    parts = [
        ("headline", "Headline", panel("Headline: loss, learning rate, gradient norm, throughput",
                                       lambda: sec.headline(runs, smoothing=smoothing), "headline")),
        ("evaluation", "Evaluation", panel("Evaluation", lambda: sec.eval_single(s), "evaluation")),
        ("configuration", "Configuration", panel("Configuration and overrides", lambda: sec.config_single(s),
                                                 "configuration")),
    ]
    if s.get("nca"):
        parts.append(("nca", "NCA", panel("NCA pre-pretraining", lambda: sec.nca_single(s["nca"]), "nca")))
    parts += [
        ("tracking", "Tracking", panel("Tracking: MLflow and Prefect", lambda: sec.links_single(s["links"]),
                                       "tracking")),
        ("geometry", "Geometry", f'<section id="geometry"><h2>Geometry</h2>{safe(lambda: sec.geometry(runs))}'
                                 f"</section>"),
        ("notes", f"Notes ({len(s['notes'])})", panel("Notes on missing or bad data", lambda: sec.notes(runs),
                                                      "notes")),
    ]
    return page(s.get("title") or s["name"], subtitle, parts)


def compare_page(runs: list[dict[str, Any]], title: str, rel: float) -> str:
    from kotodama_core.report import sections as sec

    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    named = list(zip(names, runs))
    subtitle = (f"{len(runs)} runs: " + ", ".join(f"<code>{esc(n)}</code>" for n in names)
                + f" · cells in <span class=diff>red</span> differ by more than {rel:.0%} across runs")
    parts = [
        ("headline", "Headline", panel("Headline: loss, learning rate, gradient norm, throughput",
                                       lambda: sec.headline(named, rel=rel), "headline")),
        ("evaluation", "Evaluation", panel("Evaluation", lambda: sec.eval_compare(named, rel), "evaluation")),
        ("configuration", "Configuration", panel("Configuration: what differs between the runs",
                                                 lambda: sec.config_compare(named), "configuration")),
    ]
    if any(r.get("nca") for r in runs):
        parts.append(("nca", "NCA", panel("NCA pre-pretraining", lambda: sec.nca_compare(named), "nca")))
    parts += [
        ("tracking", "Tracking", panel("Tracking: MLflow and Prefect", lambda: sec.links_compare(named),
                                       "tracking")),
        ("geometry", "Geometry", f'<section id="geometry"><h2>Geometry</h2>'
                                 f"{safe(lambda: sec.geometry(named, rel=rel))}</section>"),
        ("notes", f"Notes ({sum(len(r['notes']) for r in runs)})",
         panel("Notes on missing or bad data", lambda: sec.notes(named), "notes")),
    ]
    return page(title, subtitle, parts)
