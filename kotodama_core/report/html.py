"""HTML pages (no external resources: CSS inline, plots as data URIs)."""

from __future__ import annotations

import html
import math
from typing import Any, Callable

from kotodama_core.eval.results import format_value
from kotodama_core.report.plots import line_plot, profile_plot

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{background:#fff4d6;
border-left:4px solid #e0a000;padding:4px 8px;margin:4px 0}.diff{background:#ffe0e0;font-weight:bold}
img{max-width:100%}section{margin-bottom:1.5em}"""
PROJ = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")


def esc(x: Any) -> str:
    return html.escape(str(x))


def note(text: str) -> str:
    return f'<div class="note">⚠ {esc(text)}</div>'


def num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return '<span class="note">n/a</span>'
    return f"{v:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(uri: str | None, what: str) -> str:
    return f'<img alt="{esc(what)}" src="{uri}">' if uri else note(f"{what}: no data to plot")


def panel(title: str, build: Callable[[], str]) -> str:
    """One section; a failure inside it becomes a visible note instead of a crashed page."""
    try:
        body = build()
    except Exception as exc:  # one bad panel must not take the report down
        body = note(f"could not build this panel: {type(exc).__name__}: {exc}")
    return f"<section><h2>{esc(title)}</h2>{body}</section>"


def page(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>")


def eval_table(s: dict[str, Any]) -> str:
    rows = [[esc(r["benchmark"]), esc(r["metric"]), format_value(r["metric"], r["value"])
             if r["value"] is not None else num(None)] for r in s["eval_rows"]]
    if s.get("val_bpb") is not None:
        rows.append(["val (training mix)", "bits/byte", num(s["val_bpb"], 4)])
    out = table(["Benchmark", "Metric", "value"], rows) if rows else note("no eval results")
    return out + "".join(note(f"{t}: {m}") for t, m in s["eval_errors"].items())


# (label, headline key, digits; None = an integer count shown with thousands separators)
HEADLINE = (("final training loss", "final_loss", 4), ("training loss, last 10 % of logs", "tail_loss", 4),
            ("val loss (training run)", "val_loss", 4), ("val bits/byte (eval)", "val_bpb", 4),
            ("throughput, tokens/s (median)", "tokens_per_s", 0), ("tokens seen", "tokens_seen", None),
            ("steps", "steps", None), ("model file bytes", "model_bytes", None),
            ("quantized artifact bytes", "quant_bytes", None), ("artifact + code bytes", "quant_total_bytes", None),
            ("val bits/byte, dequantized", "val_bpb_quant", 4), ("quantization gap, bits/byte", "val_bpb_quant_gap", 4))


def _headline_cell(v: Any, digits: int | None, cls: str = "") -> str:
    if digits is None and isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"<span{cls}>{int(v):,}</span>"
    return f"<span{cls}>{num(v, digits or 0)}</span>"


def headline_table(runs: list[dict[str, Any]], names: list[str], rel: float | None = None) -> str:
    """Loss, val_bpb, throughput and bytes side by side; rows no run has are left out."""
    rows = []
    for label, key, digits in HEADLINE:
        values = [(r.get("headline") or {}).get(key) for r in runs]
        if all(v is None for v in values):
            continue
        nums = [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values]
        cls = ' class="diff"' if rel is not None and _differs(nums, rel) else ""
        rows.append([esc(label)] + [_headline_cell(v, digits, cls) for v in values])
    if not rows:
        return note("no headline numbers (summaries written before they existed)")
    return table(["", *names], rows)


def run_page(s: dict[str, Any], title: str, smoothing: int = 1) -> str:
    name = s["name"]
    prof = s["profiles"]
    sections = [
        "".join(note(n) for n in s["notes"]),
        panel("Summary", lambda: headline_table([s], [name])),
        panel("Loss and learning rate", lambda: img(line_plot({name: s["metrics"]}, "loss", "training loss", "loss",
                                                              smoothing), "loss curve")
              + img(line_plot({name: s["metrics"]}, "lr_mult", "learning-rate multiplier (WSD)",
                                      "× base LR"), "learning-rate curve")),
        panel("Evaluation", lambda: eval_table(s)),
        panel("Stable rank across depth", lambda: img(profile_plot(prof["stable_rank"], "stable rank", "‖W‖F²/σmax²"),
                                                      "stable-rank profile")
              + table(["Layer", *PROJ], [[str(layer)] + [num(prof["stable_rank"][p].get(layer), 1) for p in PROJ]
                                         for layer in sorted({k for p in PROJ for k in prof["stable_rank"][p]})])),
        panel("Attention entropy and BOS mass per layer", lambda: img(profile_plot(
            {"entropy (nats)": prof["attn_entropy_mean"]}, "attention entropy", "nats"), "entropy profile")
              + img(profile_plot({"BOS mass": prof["bos_mass"]}, "BOS attention mass", "share"), "BOS profile")
              + table(["Layer", "Mean entropy", "Std", "BOS mass"],
                      [[str(k), num(v, 2), num(prof["attn_entropy_std"].get(k), 2), num(prof["bos_mass"].get(k))]
                       for k, v in prof["attn_entropy_mean"].items()])),
        panel("Anisotropy profile", lambda: img(profile_plot({"anisotropy": prof["anisotropy"]}, "anisotropy",
                                                             "mean pairwise cosine"), "anisotropy profile")
              + table(["Layer", "Anisotropy", "Dead units"],
                      [[str(k), num(v), num(prof["dead_units"].get(k))] for k, v in prof["anisotropy"].items()])),
        panel("RankMe trajectory", lambda: img(_rankme_plot({name: s["geo"]}), "RankMe trajectory")),
        panel(f"Head entropy at layer {s['head_entropy_layer']}", lambda: table(
            ["Head", "Entropy (nats)"], [[f"H{h}", num(v, 2)] for h, v in s["head_entropy"].items()])
              if s["head_entropy"] else note("no per-head entropy in geo_metrics.jsonl")),
    ]
    return page(f"{title}: {name}", sections)


def _rankme_plot(runs: dict[str, list[dict[str, Any]]]) -> str | None:
    from kotodama_core.report.plots import plt, to_data_uri, _series

    fig, ax = plt.subplots(figsize=(6, 3.2))
    drawn = False
    for name, rows in runs.items():
        for key in ("embed/rankme", "final/rankme"):
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker=".", label=f"{name} {key}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="RankMe", xlabel="step", ylabel="effective rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def _differs(values: list[float | None], rel: float) -> bool:
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return False
    lo, hi = min(vals), max(vals)
    return (hi - lo) > rel * max(abs(hi), abs(lo), 1e-12)


def compare_rows(label_values: list[tuple[str, list[float | None]]], rel: float, digits: int = 3) -> list[list[str]]:
    rows = []
    for label, values in label_values:
        cls = ' class="diff"' if _differs(values, rel) else ""
        rows.append([esc(label)] + [f"<span{cls}>{num(v, digits)}</span>" for v in values])
    return rows


def compare_page(runs: list[dict[str, Any]], title: str, rel: float) -> str:
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]

    def eval_section() -> str:
        keys = []
        for r in runs:
            for row in r["eval_rows"]:
                k = (row["benchmark"], row["metric"])
                if k not in keys:
                    keys.append(k)
        lookup = [{(row["benchmark"], row["metric"]): row["value"] for row in r["eval_rows"]} for r in runs]
        items = [(f"{b} {m}", [lk.get((b, m)) for lk in lookup]) for b, m in keys]
        items.append(("val bits/byte", [r.get("val_bpb") for r in runs]))
        return table(["Benchmark / metric", *names], compare_rows(items, rel))

    def profile_section(key: str, digits: int = 3) -> str:
        layers = sorted({k for r in runs for k in r["profiles"][key]})
        items = [(f"L{layer}", [r["profiles"][key].get(layer) for r in runs]) for layer in layers]
        return table(["Layer", *names], compare_rows(items, rel, digits)) if items else note("no data")

    def stable_rank_section() -> str:
        items = []
        for p in PROJ:
            for layer in sorted({k for r in runs for k in r["profiles"]["stable_rank"][p]}):
                items.append((f"L{layer} {p}", [r["profiles"]["stable_rank"][p].get(layer) for r in runs]))
        return table(["Matrix", *names], compare_rows(items, rel, 1)) if items else note("no data")

    sections = [
        f"<p>Cells in <span class=diff>red</span> differ by more than {rel:.0%} across runs.</p>",
        "".join(note(f"{n}: {msg}") for n, r in zip(names, runs) for msg in r["notes"]),
        panel("Summary: loss, val_bpb, throughput, bytes", lambda: headline_table(runs, names, rel)),
        panel("Loss", lambda: img(line_plot(dict(zip(names, [r["metrics"] for r in runs])), "loss",
                                            "training loss", "loss"), "loss curves")),
        panel("Evaluation", eval_section),
        panel("Stable rank", stable_rank_section),
        panel("Attention entropy (mean over heads)", lambda: profile_section("attn_entropy_mean", 2)),
        panel("BOS mass", lambda: profile_section("bos_mass")),
        panel("Anisotropy", lambda: profile_section("anisotropy")),
        panel("RankMe trajectory", lambda: img(_rankme_plot(dict(zip(names, [r["geo"] for r in runs]))), "RankMe")),
    ]
    return page(title, sections)
