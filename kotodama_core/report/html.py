"""HTML pages (no external resources: CSS inline, plots as data URIs), headline first.

Both pages have the same order: headline numbers and training curves, evaluation, configuration, NCA
pre-pretraining (when there is one), tracking links, then the geometry charts grouped by family, and last
the notes about missing or bad data.
"""

from __future__ import annotations

from typing import Any

from kotodama_core.report import sections as sec
from kotodama_core.report.elements import esc, page, panel, safe


def run_page(s: dict[str, Any], report_title: str, smoothing: int = 1) -> str:
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
