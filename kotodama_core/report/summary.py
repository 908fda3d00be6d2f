"""Read a run's artifacts into one JSON-able summary; every problem becomes a note, never an exception."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kotodama_core.eval.results import finite
from kotodama_core.report.config_summary import config_summary, read_run_config
from kotodama_core.report.curves import tokens_per_step
from kotodama_core.report.eval_rows import eval_rows
from kotodama_core.report.nca_summary import nca_summary

LAYER_KEY = re.compile(r"^L(\d+)/(.+)$")


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        notes.append(f"{path.name} missing")
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            notes.append(f"{path.name}:{n} is not valid JSON (skipped)")
    if not rows:
        notes.append(f"{path.name} is empty")
    return rows


def layer_profile(geo_last: dict[str, Any], suffix: str) -> dict[int, float | None]:
    """{layer: value} for keys L{i}/{suffix} of one monitor record."""
    out = {}
    for key, value in geo_last.items():
        m = LAYER_KEY.match(key)
        if m and m.group(2) == suffix:
            out[int(m.group(1))] = finite(value)
    return dict(sorted(out.items()))


def _median(values: list[float]) -> float | None:
    vals = sorted(values)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def headline(train_dir: Path | None, metrics: list[dict[str, Any]], val_bpb: float | None,
             export_dir: Path | None, notes: list[str]) -> dict[str, Any]:
    """The numbers an ablation compares: loss, val_bpb, throughput, bytes (None where unknown)."""
    manifest = {}
    if train_dir is not None and (train_dir / "manifest.json").is_file():
        manifest = json.loads((train_dir / "manifest.json").read_text())
    final = manifest.get("metrics", {})
    losses = [v for v in (finite(r.get("loss")) for r in metrics) if v is not None]
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    # The first logged interval holds start-up (data loader, compile); throughput is the median of the rest.
    speeds = [v for v in (finite(r.get("tokens_per_s")) for r in metrics[1:] or metrics) if v is not None]
    mfus = [v for v in (finite(r.get("mfu")) for r in metrics[1:] or metrics) if v is not None]
    model_file = train_dir / manifest.get("model_file", "model.pt.zst") if train_dir is not None else None
    out: dict[str, Any] = {
        "final_loss": finite(final.get("final_loss")) if "final_loss" in final else (losses[-1] if losses else None),
        "tail_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": finite(final.get("val_loss")),
        "val_loss_averaged": finite(final.get("val_loss_averaged")),
        "val_bpb": val_bpb,
        "tokens_per_s": _median(speeds),
        "mfu": _median(mfus),
        "tokens_seen": final.get("tokens_seen"),
        "steps": final.get("steps"),
        "model_bytes": model_file.stat().st_size if model_file is not None and model_file.is_file() else None,
        "quant_bytes": None, "quant_total_bytes": None, "val_bpb_quant": None, "val_bpb_quant_gap": None,
    }
    if export_dir is not None:
        path = export_dir / "manifest.json"
        if path.is_file():
            em = json.loads(path.read_text()).get("metrics", {})
            out.update(quant_bytes=em.get("artifact_bytes"), quant_total_bytes=em.get("total_bytes"),
                       val_bpb_quant=finite(em.get("val_bpb_quant")), val_bpb_quant_gap=finite(em.get("val_bpb_gap")))
        else:
            notes.append(f"{export_dir}: no manifest.json")
    return out


def _read_manifest(folder: Path | None, notes: list[str]) -> dict[str, Any] | None:
    if folder is None:
        return None
    path = folder / "manifest.json"
    if not path.is_file():
        notes.append(f"{folder}: no manifest.json")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        notes.append(f"{path} is not valid JSON")
        return None


def summarize_run(train_dir: Path | None, eval_dir: Path | None, name: str | None = None,
                  export_dir: Path | None = None, *, nca_train_dir: Path | None = None,
                  boundaries_dir: Path | None = None, report_config: dict[str, Any] | None = None,
                  configs_root: Path | None = None, links: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything one run's page shows, as JSON-able data (summary.json keeps it for comparison pages).

    `report_config` (the report stage's resolved config) stands in for the run's config when the training
    artifact has no config.yaml; `configs_root` is where the run's base config file is looked up."""
    from kotodama_core.config_tree import CONFIGS_ROOT

    notes: list[str] = []
    summary: dict[str, Any] = {"name": name, "notes": notes, "metrics": [], "geo": [], "eval_rows": [],
                               "eval_errors": {}, "val_bpb": None, "links": links or {"mlflow": [], "prefect": None}}
    manifest = None
    if train_dir is None:
        notes.append("no training artifact given")
    else:
        manifest = _read_manifest(train_dir, notes)
        if manifest is not None:
            summary["train_digest"] = manifest.get("digest")
        summary["metrics"] = read_jsonl(train_dir / "metrics.jsonl", notes)
        summary["geo"] = read_jsonl(train_dir / "geo_metrics.jsonl", notes)
    run_config = read_run_config(train_dir, notes) or report_config
    summary["run_config"] = run_config
    summary["config"] = (config_summary(run_config, manifest, configs_root or CONFIGS_ROOT, notes)
                         if run_config else None)
    summary["name"] = (summary["name"] or (summary["config"] or {}).get("name") or (manifest or {}).get("run_name")
                       or (train_dir.name if train_dir is not None else None) or "run")
    summary["title"] = (summary["config"] or {}).get("title") or summary["name"]
    if eval_dir is None:
        notes.append("no eval artifact given")
    elif not (eval_dir / "results.json").is_file():
        notes.append(f"{eval_dir}: results.json missing")
    else:
        res = json.loads((eval_dir / "results.json").read_text())
        summary["eval_rows"] = eval_rows(res)
        summary["eval_errors"] = res.get("errors", {})
        summary["val_bpb"] = (res.get("val_bpb") or {}).get("val_bpb")
    summary["nca"] = nca_summary(nca_train_dir, boundaries_dir, run_config, notes)
    gbt = ((run_config or {}).get("train") or {}).get("global_batch_tokens")
    summary["tokens_per_step"] = tokens_per_step(summary["metrics"], gbt if isinstance(gbt, int) else None)
    geo_last = summary["geo"][-1] if summary["geo"] else {}
    summary["final_geo"] = geo_last
    summary["profiles"] = {
        "stable_rank": {p: layer_profile(geo_last, f"stable_rank/{p}")
                        for p in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")},
        "attn_entropy_mean": layer_profile(geo_last, "attn_entropy_mean"),
        "attn_entropy_std": layer_profile(geo_last, "attn_entropy_std"),
        "bos_mass": layer_profile(geo_last, "bos_mass"),
        "anisotropy": layer_profile(geo_last, "anisotropy"),
        "dead_units": layer_profile(geo_last, "dead_units"),
    }
    first_layer = min(summary["profiles"]["attn_entropy_mean"], default=None)
    heads = {}
    if first_layer is not None:
        for key, value in geo_last.items():
            m = re.match(rf"^L{first_layer}/head(\d+)/attn_entropy$", key)
            if m:
                heads[int(m.group(1))] = finite(value)
    summary["head_entropy_layer"] = first_layer
    summary["head_entropy"] = dict(sorted(heads.items()))
    summary["headline"] = headline(train_dir, summary["metrics"], summary["val_bpb"], export_dir, notes)
    return summary


def restore_layer_keys(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON turns the int layer/head keys into strings; turn them back after reading summary.json."""
    def ints(d: dict) -> dict:
        return {int(k): v for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}

    prof = summary["profiles"]
    prof["stable_rank"] = {p: ints(v) for p, v in prof["stable_rank"].items()}
    for key in list(prof):
        if key != "stable_rank":
            prof[key] = ints(prof[key])
    summary["head_entropy"] = ints(summary.get("head_entropy", {}))
    return summary
