"""The parts of a report page, each for one run or several: `runs` is a list of (column name, summary)."""

from __future__ import annotations

from typing import Any

import yaml

from kotodama_core.eval.results import format_value
from kotodama_core.report.config_summary import NAMING_KEYS, flatten
from kotodama_core.report.curves import Curves, training_curves
from kotodama_core.report.nca_summary import png_data_uri
from kotodama_core.report.elements import esc, facts, img, link, note, num, panel, table
from kotodama_core.report.plots import curve_plot, plt, profile_plot, to_data_uri, _series

Runs = list[tuple[str, dict[str, Any]]]
PROJ = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")
CONFIG_ROWS_MAX = 80

# (label, headline key, digits; None = an integer count shown with thousands separators)
HEADLINE = (("final training loss", "final_loss", 4), ("training loss, last 10 % of logs", "tail_loss", 4),
            ("val loss (training run)", "val_loss", 4),
            ("val loss, averaged weights (EMA/SWA)", "val_loss_averaged", 4), ("val bits/byte (eval)", "val_bpb", 4),
            ("throughput, tokens/s (median)", "tokens_per_s", 0), ("MFU (median)", "mfu", 4),
            ("tokens seen", "tokens_seen", None), ("steps", "steps", None), ("model file bytes", "model_bytes", None),
            ("quantized artifact bytes", "quant_bytes", None), ("artifact + code bytes", "quant_total_bytes", None),
            ("val bits/byte, dequantized", "val_bpb_quant", 4), ("quantization gap, bits/byte", "val_bpb_quant_gap", 4))


def differs(values: list[float | None], rel: float) -> bool:
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return False
    lo, hi = min(vals), max(vals)
    return (hi - lo) > rel * max(abs(hi), abs(lo), 1e-12)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _headline_cell(v: Any, digits: int | None, cls: str = "") -> str:
    if digits is None and _number(v) is not None:
        return f"<span{cls}>{int(v):,}</span>"
    return f"<span{cls}>{num(v, digits or 0)}</span>"


def headline_table(runs: Runs, rel: float | None = None) -> str:
    """Loss, val_bpb, throughput and bytes side by side; rows no run has are left out."""
    rows = []
    for label, key, digits in HEADLINE:
        values = [(s.get("headline") or {}).get(key) for _, s in runs]
        if all(v is None for v in values):
            continue
        cls = ' class="diff"' if rel is not None and differs([_number(v) for v in values], rel) else ""
        rows.append([esc(label)] + [_headline_cell(v, digits, cls) for v in values])
    if not rows:
        return note("no headline numbers (summaries written before they existed)")
    return table(["", *[n for n, _ in runs]], rows)


# -- headline charts -----------------------------------------------------------------------------------

def _run_curves(runs: Runs) -> list[Curves]:
    def build(on_tokens: bool) -> list[Curves]:
        out = []
        for _, s in runs:
            h = s.get("headline") or {}
            out.append(training_curves(s.get("metrics") or [], s.get("tokens_per_step"), _number(h.get("val_loss")),
                                       _number(h.get("tokens_seen")), on_tokens=on_tokens))
        return out

    curves = build(True)
    return curves if all(c.x_is_tokens for c in curves) else build(False)  # one x axis for every run


def headline_charts(runs: Runs, smoothing: int = 1) -> str:
    per_run = _run_curves(runs)
    many = len(runs) > 1
    if many:
        for i, ((name, _), c) in enumerate(zip(runs, per_run)):
            for curve in [*c.loss, *c.lr, *c.grad_norm, *c.tokens_per_s]:
                curve.color = f"C{i % 10}"
                curve.label = name if curve.label in ("train loss", "grad norm (before clipping)", "tokens/s") \
                    else f"{name}: {curve.label}"
    steps = {c.tokens_per_step for c in per_run}
    x_is_tokens = all(c.x_is_tokens for c in per_run)
    common = dict(x_is_tokens=x_is_tokens, tokens_per_step=steps.pop() if len(steps) == 1 else None)
    multiplier = all(c.lr_is_multiplier for c in per_run)
    charts = [
        img(curve_plot([x for c in per_run for x in c.loss], "Loss: train (line), validation (dots)", "loss",
                       smoothing=smoothing, **common), "loss curve"),
        img(curve_plot([x for c in per_run for x in c.lr],
                       "Learning-rate multiplier (WSD)" if multiplier else "Learning rate",
                       "× base lr" if multiplier else "lr (log scale)", logy=not multiplier, **common),
            "learning-rate curve"),
        img(curve_plot([x for c in per_run for x in c.grad_norm], "Gradient norm (before clipping)", "‖g‖₂",
                       **common), "gradient-norm curve"),
        img(curve_plot([x for c in per_run for x in c.tokens_per_s], "Throughput", "tokens/s", **common),
            "throughput curve"),
    ]
    out = f'<div class="grid">{"".join(charts)}</div>'
    if not x_is_tokens:
        out += note("tokens per step unknown (no tokens_seen in metrics.jsonl, no config): the x axis is steps")
    if all((s.get("headline") or {}).get("mfu") is None for _, s in runs):
        out += "<p class=pm>MFU: n/a (the engine knows no peak FLOP/s for this device, e.g. a CPU)</p>"
    return out


def headline(runs: Runs, rel: float | None = None, smoothing: int = 1) -> str:
    return headline_table(runs, rel) + headline_charts(runs, smoothing)


# -- evaluation ----------------------------------------------------------------------------------------

BINOMIAL_NOTE = ("† binomial standard error sqrt(p (1 − p) / (n − 1)), computed here from n and the accuracy p "
                 "(the eval gave none)")


def _stderr_cell(row: dict[str, Any]) -> str:
    stderr = row.get("stderr")
    if stderr is None:
        return '<span class="pm">–</span>'
    return f"± {stderr:.3f}" + ("†" if row.get("stderr_source") == "binomial" else "")


def eval_single(s: dict[str, Any]) -> str:
    rows = [[esc(r["benchmark"]), esc(r["metric"]),
             format_value(r["metric"], r["value"]) if r.get("value") is not None else num(None),
             _stderr_cell(r), f"{r['n']:,}" if r.get("n") is not None else '<span class="pm">–</span>']
            for r in s.get("eval_rows") or []]
    if s.get("val_bpb") is not None:
        rows.append(["val (training mix)", "bits/byte", num(s["val_bpb"], 4), '<span class="pm">–</span>',
                     '<span class="pm">–</span>'])
    out = table(["Benchmark", "Metric", "value", "stderr", "n"], rows, left=2) if rows else note("no eval results")
    if any(r.get("stderr_source") == "binomial" for r in s.get("eval_rows") or []):
        out += f"<p class=pm>{esc(BINOMIAL_NOTE)}</p>"
    return out + "".join(note(f"{t}: {m}") for t, m in (s.get("eval_errors") or {}).items())


def spread_in_stderrs(cells: list[dict[str, Any]]) -> float | None:
    """How far apart the best and worst run are, in standard errors of their difference:
    z = (v_max − v_min) / sqrt(se_max² + se_min²). Below about 2 the gap is within sampling noise.
    None unless both ends have a value and a standard error (and they are not both 0)."""
    known = [c for c in cells if _number(c.get("value")) is not None]
    if len(known) < 2:
        return None
    lo = min(known, key=lambda c: c["value"])
    hi = max(known, key=lambda c: c["value"])
    if lo.get("stderr") is None or hi.get("stderr") is None:
        return None
    scale = (lo["stderr"] ** 2 + hi["stderr"] ** 2) ** 0.5
    return (hi["value"] - lo["value"]) / scale if scale > 0 else None


def eval_compare(runs: Runs, rel: float) -> str:
    keys: list[tuple[str, str]] = []
    for _, s in runs:
        for row in s.get("eval_rows") or []:
            if (row["benchmark"], row["metric"]) not in keys:
                keys.append((row["benchmark"], row["metric"]))
    lookup = [{(row["benchmark"], row["metric"]): row for row in s.get("eval_rows") or []} for _, s in runs]
    rows = []
    for b, m in keys:
        cells = [lk.get((b, m)) or {} for lk in lookup]
        cls = ' class="diff"' if differs([c.get("value") for c in cells], rel) else ""
        z = spread_in_stderrs(cells)
        rows.append([f"{esc(b)} {esc(m)}"] + [
            f"<span{cls}>{num(c.get('value'))}</span>"
            + (f' <span class="pm">{_stderr_cell(c)}</span>' if c.get("stderr") is not None else "")
            + (f' <span class="pm">n={c["n"]:,}</span>' if c.get("n") is not None else "") for c in cells]
            + [f"{z:.1f}" if z is not None else '<span class="pm">–</span>'])
    bpb = [s.get("val_bpb") for _, s in runs]
    cls = ' class="diff"' if differs(bpb, rel) else ""
    rows.append(["val bits/byte"] + [f"<span{cls}>{num(v)}</span>" for v in bpb] + ['<span class="pm">–</span>'])
    out = table(["Benchmark / metric", *[n for n, _ in runs], "spread / stderr"], rows)
    out += ("<p class=pm>spread / stderr: (best − worst) / sqrt(se_best² + se_worst²); below about 2 the runs "
            "differ by no more than sampling noise on this many examples.</p>")
    if any(r.get("stderr_source") == "binomial" for _, s in runs for r in s.get("eval_rows") or []):
        out += f"<p class=pm>{esc(BINOMIAL_NOTE)}</p>"
    return out


# -- configuration -------------------------------------------------------------------------------------

def _value(v: Any) -> str:
    if v is None:
        return "–"
    text = v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...")
    return f"<code>{esc(text.strip())}</code>"


def _short_digest(d: Any) -> str:
    return f"<code>{esc(str(d)[:16])}</code>" if d else "–"


def config_single(s: dict[str, Any]) -> str:
    c = s.get("config")
    if not c:
        return note("no run config (no config.yaml in the training artifact and none given)")
    ablation = c.get("ablation")
    out = facts([("run name", f"<code>{esc(c['name'])}</code>"), ("preset", esc(c["preset"])),
                 ("pipeline", esc(c["pipeline"])),
                 *([("ablation / arm", f"<code>configs/ablations/{esc(ablation['name'])}.yaml</code> / "
                                       f"{esc(ablation['arm'])}")] if ablation else []),
                 ("config digest", _short_digest(c.get("config_digest"))),
                 ("training artifact", _short_digest(c.get("train_digest"))),
                 ("code version", esc(c.get("code_version") or "–")),
                 ("base config", f"<code>{esc(c['base_path'])}</code>" if c.get("base_path") else "–")])
    if not c.get("base_found"):
        return out + note(f"no base config configs/runs/{c['name']}.yaml (nor an ablation arm's) to compare "
                          f"with: overrides unknown")
    overrides = c.get("overrides") or []
    if not overrides:
        return out + f"<p>No overrides: the run is <code>{esc(c['base_path'])}</code> as it is.</p>"
    rows = [[f"<code>{esc(o['key'])}</code>", _value(o.get("base")), _value(o.get("value"))] for o in overrides]
    return out + f"<h3>Overrides ({len(overrides)})</h3>" + table(["key", "base", "this run"], rows, left=3)


def config_compare(runs: Runs) -> str:
    configs = [s.get("config") or {} for _, s in runs]
    rows = [[label] + [esc(c.get(key) or "–") if key != "config_digest" else _short_digest(c.get(key))
                       for c in configs]
            for label, key in (("run name", "name"), ("preset", "preset"), ("pipeline", "pipeline"),
                               ("config digest", "config_digest"))]
    out = table(["", *[n for n, _ in runs]], rows, left=len(runs) + 1)
    flat = [flatten(s.get("run_config") or {}) for _, s in runs]
    if not all(flat):
        return out + note("some runs have no recorded config; their differences cannot be listed")
    keys = sorted({k for f in flat for k in f if k not in NAMING_KEYS
                   and len({repr(g.get(k)) for g in flat}) > 1})
    if not keys:
        return out + "<p>The runs have the same configuration.</p>"
    rows = [[f"<code>{esc(k)}</code>"] + [_value(f.get(k)) for f in flat] for k in keys[:CONFIG_ROWS_MAX]]
    out += f"<h3>Keys that differ ({len(keys)})</h3>" + table(["key", *[n for n, _ in runs]], rows,
                                                                      left=len(runs) + 1)
    if len(keys) > CONFIG_ROWS_MAX:
        out += note(f"{len(keys) - CONFIG_ROWS_MAX} more differing keys not shown")
    return out


# -- NCA -----------------------------------------------------------------------------------------------

def _count(v: Any) -> str:
    return f"{int(v):,}" if _number(v) is not None else "–"


def _nca_rows(nca: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(part, quantity, value) for one run's NCA summary."""
    search, data, train = nca.get("search") or {}, nca.get("data") or {}, nca.get("train") or {}
    band = nca.get("band")
    return [
        ("rule search", "rules tried", _count(search.get("tries"))),
        ("rule search", "passed the gzip band", _count(search.get("passed"))),
        ("rule search", "kept", _count(search.get("kept"))),
        ("rule search", "pass rate", f"{search['pass_rate']:.1%}" if _number(search.get("pass_rate")) is not None
         else "–"),
        ("rule search", "gzip-ratio band", f"{band[0]:g} – {band[1]:g}" if isinstance(band, list) and len(band) == 2
         else "–"),
        ("trajectories", "train rules / trajectories / tokens",
         " / ".join(_count(data.get(f"train_{k}")) for k in ("rules", "trajectories", "tokens"))),
        ("trajectories", "val rules / trajectories / tokens",
         " / ".join(_count(data.get(f"val_{k}")) for k in ("rules", "trajectories", "tokens"))),
        ("NCA training", "final loss", num(train.get("final_loss"), 4)),
        ("NCA training", "val loss", num(train.get("val_loss"), 4)),
        ("NCA training", "steps / tokens", f"{_count(train.get('steps'))} / {_count(train.get('tokens_seen'))}"),
        ("boundaries", "found (AttnRes block starts)", _value(nca.get("boundaries"))),
        ("boundaries", "this run's model.attn_res_boundaries", _value(nca.get("run_boundaries"))),
    ]


def nca_single(nca: dict[str, Any]) -> str:
    out = table(["part", "quantity", "value"], [[esc(p), esc(q), v] for p, q, v in _nca_rows(nca)], left=2)
    found, used = nca.get("boundaries"), nca.get("run_boundaries")
    if found is not None and used is not None and list(found) != list(used):
        out += (f"<p class=pm>This run's model.attn_res_boundaries {_value(used)} are not the block starts the NCA "
                f"model's geometry suggests {_value(found)}.</p>")
    if nca.get("profile_png"):
        profile = img(png_data_uri(nca["profile_png"]), "NCA layer profile and gap scores (red: block starts)",
                      cls="tall")
        out = f'<div class="grid"><div>{out}</div><div>{profile}</div></div>'
    return out


def nca_compare(runs: Runs) -> str:
    tables = [_nca_rows(s["nca"]) if s.get("nca") else None for _, s in runs]
    template = next(t for t in tables if t is not None)
    rows = []
    for i, (part, quantity, _) in enumerate(template):
        rows.append([esc(f"{part}: {quantity}")] + [t[i][2] if t is not None else "–" for t in tables])
    return table(["", *[n for n, _ in runs]], rows)


# -- tracking links ------------------------------------------------------------------------------------

def _mlflow_cell(links: dict[str, Any]) -> str:
    runs = links.get("mlflow") or []
    if not runs:
        return "not tracked"
    return "<br>".join(f"{esc(r['label'])}: {link(r.get('url'), r['run_id'])}" for r in runs)


def _prefect_cell(links: dict[str, Any]) -> str:
    p = links.get("prefect")
    if not p:
        return "not tracked"
    return f"flow run {link(p.get('url'), p['flow_run_id'])}"


def links_single(links: dict[str, Any]) -> str:
    mlflow_where = f" (tracking URI <code>{esc(links['mlflow_uri'])}</code>)" if links.get("mlflow_uri") else ""
    return facts([("MLflow", _mlflow_cell(links) + mlflow_where), ("Prefect", _prefect_cell(links))])


def links_compare(runs: Runs) -> str:
    return table(["Run", "MLflow", "Prefect"],
                 [[esc(n), _mlflow_cell(s.get("links") or {}), _prefect_cell(s.get("links") or {})] for n, s in runs],
                 left=3)


# -- geometry, by family -------------------------------------------------------------------------------

def _rankme_plot(runs: Runs) -> str | None:
    fig, ax = plt.subplots(figsize=(5.4, 3.0))
    drawn = False
    for i, (name, s) in enumerate(runs):
        for key, style in (("embed/rankme", "-"), ("final/rankme", "--")):
            xs, ys = _series(s.get("geo") or [], key)
            if xs:
                many = len(runs) > 1
                ax.plot(xs, ys, style, marker=".", label=f"{name} {key}" if many else key,
                        color=f"C{i % 10}" if many else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="RankMe", xlabel="step", ylabel="effective rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def _compare_rows(label_values: list[tuple[str, list[float | None]]], rel: float, digits: int) -> list[list[str]]:
    rows = []
    for label, values in label_values:
        cls = ' class="diff"' if differs(values, rel) else ""
        rows.append([esc(label)] + [f"<span{cls}>{num(v, digits)}</span>" for v in values])
    return rows


def _profile_compare(runs: Runs, key: str, rel: float, digits: int = 3) -> str:
    layers = sorted({k for _, s in runs for k in s["profiles"][key]})
    items = [(f"L{layer}", [s["profiles"][key].get(layer) for _, s in runs]) for layer in layers]
    return table(["Layer", *[n for n, _ in runs]], _compare_rows(items, rel, digits)) if items else note("no data")


def _weights(runs: Runs, rel: float) -> str:
    if len(runs) == 1:
        prof = runs[0][1]["profiles"]["stable_rank"]
        layers = sorted({k for p in PROJ for k in prof[p]})
        plot = img(profile_plot(prof, "stable rank", "‖W‖F²/σmax²"), "stable-rank profile")
        values = table(["Layer", *PROJ], [[str(layer)] + [num(prof[p].get(layer), 1) for p in PROJ]
                                          for layer in layers])
        return f'<div class="grid"><div>{plot}</div><div>{values}</div></div>'

    items = [(f"L{layer} {p}", [s["profiles"]["stable_rank"][p].get(layer) for _, s in runs]) for p in PROJ
             for layer in sorted({k for _, s in runs for k in s["profiles"]["stable_rank"][p]})]
    return "<p>Stable rank ‖W‖F²/σmax² per matrix</p>" + (
        table(["Matrix", *[n for n, _ in runs]], _compare_rows(items, rel, 1)) if items else note("no data"))


def _attention(runs: Runs, rel: float) -> str:
    if len(runs) > 1:
        return ("<p>Mean attention entropy over heads (nats)</p>" + _profile_compare(runs, "attn_entropy_mean", rel, 2)
                + "<p>BOS mass (attention to the first token)</p>" + _profile_compare(runs, "bos_mass", rel))
    s = runs[0][1]
    prof = s["profiles"]
    entropy = img(profile_plot({"entropy (nats)": prof["attn_entropy_mean"]}, "attention entropy", "nats"),
                  "entropy profile")
    bos = img(profile_plot({"BOS mass": prof["bos_mass"]}, "BOS attention mass", "share"), "BOS profile")
    out = (f'<div class="grid">{entropy}{bos}</div>'
           + table(["Layer", "Mean entropy", "Std", "BOS mass"],
                   [[str(k), num(v, 2), num(prof["attn_entropy_std"].get(k), 2), num(prof["bos_mass"].get(k))]
                    for k, v in prof["attn_entropy_mean"].items()]))
    heads = s.get("head_entropy") or {}
    out += f"<p>Head entropy at layer {esc(s.get('head_entropy_layer'))}</p>"
    return out + (table(["Head", "Entropy (nats)"], [[f"H{h}", num(v, 2)] for h, v in heads.items()])
                  if heads else note("no per-head entropy in geo_metrics.jsonl"))


def _representations(runs: Runs, rel: float) -> str:
    rankme = img(_rankme_plot(runs), "RankMe trajectory")
    if len(runs) > 1:
        return ("<p>Anisotropy (mean pairwise cosine)</p>" + _profile_compare(runs, "anisotropy", rel)
                + "<p>Dead MLP units</p>" + _profile_compare(runs, "dead_units", rel) + rankme)
    prof = runs[0][1]["profiles"]
    aniso = img(profile_plot({"anisotropy": prof["anisotropy"]}, "anisotropy", "mean pairwise cosine"),
                "anisotropy profile")
    return (f'<div class="grid">{aniso}{rankme}</div>'
            + table(["Layer", "Anisotropy", "Dead units"],
                    [[str(k), num(v), num(prof["dead_units"].get(k))] for k, v in prof["anisotropy"].items()]))


GEOMETRY_FAMILIES = (("Weights: stable rank across depth", _weights),
                     ("Attention: entropy and BOS mass per layer", _attention),
                     ("Representations: anisotropy, dead units, RankMe", _representations))


def geometry(runs: Runs, rel: float = 0.05) -> str:
    return "".join(panel(title, lambda build=build: build(runs, rel), level=3) for title, build in GEOMETRY_FAMILIES)


def notes(runs: Runs) -> str:
    many = len(runs) > 1
    items = [note(f"{name}: {msg}" if many else msg) for name, s in runs for msg in s.get("notes") or []]
    return "".join(items) or "<p>None.</p>"
